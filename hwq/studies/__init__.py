"""Studies over many programs: the resumable bit-width sweep and the reports drawn from it."""
