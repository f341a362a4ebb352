"""The silicon side of hwq: a Verilog MAC array and its co-simulation against accel_sim.

verilog/ holds the synthesizable Verilog-2005 sources (mac_tile = mac_array + requant
lanes); sim builds and runs them through cocotb (Icarus Verilog or Verilator), testbench is
the cocotb test that plays tiles into them, cosim turns conv layers into tiles and compares
the RTL with accel_sim, cycles tabulates RTL cycles against accel_sim.timing, and area
synthesizes the array with Yosys over a grid of bit widths.
"""
