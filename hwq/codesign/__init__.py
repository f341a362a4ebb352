"""Co-design: search accelerators and per-layer widths jointly with the weights (`hwq codesign`)."""
