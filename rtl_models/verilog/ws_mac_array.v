`timescale 1ns / 1ps
// ROWS x COLS weight-stationary MAC array: the microarchitecture that
// accel_sim.timing.tile_compute_cycles describes for "ws" (SCALE-Sim's dataflow of that name).
//
// GEMM tile: array row r holds reduction index k0 + r, column c output channel n0 + c;
// the tile's T output pixels stream through in time. Cycles 0..ROWS-1 load the weights:
// with `wgt_load` high the driver presents one array row per cycle, bottom row first, and
// each column shifts them down. From cycle ROWS on, in cycle ROWS + m the driver presents
// pixel m: its activations a[m][k0 .. k0+ROWS-1] (`act_in`, lane r for row r) and the
// partial sum each column starts from (`psum_in`, with `in_valid`). Skew registers delay
// row r by r cycles and column c's partial sum by c cycles, activations move right and
// partial sums down one PE per cycle, so PE (r, c) adds its product for pixel m in cycle
// ROWS + m + r + c and the sum for (m, c) leaves the bottom of column c in cycle
// 2*ROWS + m + c (`out_valid[c]`, `out_acc`): pixels leave each column in order, and the
// last output is on its port in cycle T + 2*ROWS + COLS - 2.
module ws_mac_array #(
    parameter ROWS = 4,
    parameter COLS = 4,
    parameter WEIGHT_BITS = 4,
    parameter ACT_BITS = 8,
    parameter ACT_SIGNED = 0,
    parameter ACC_BITS = 32,
    parameter SATURATE = 0
) (
    input  wire                        clk,
    input  wire                        rst,
    input  wire                        wgt_load,
    input  wire [COLS*WEIGHT_BITS-1:0] wgt_in,
    input  wire                        in_valid,
    input  wire [ROWS*ACT_BITS-1:0]    act_in,
    input  wire [COLS*ACC_BITS-1:0]    psum_in,
    output wire [COLS-1:0]             out_valid,
    output wire [COLS*ACC_BITS-1:0]    out_acc
);
    localparam H = COLS + 1;  // horizontal links per row: PE inputs plus the last PE's output

    // One net per link (not slices of one wide bus), as in mac_array.
    /* verilator lint_off UNUSEDSIGNAL */  // weights and activations leaving the last row and column
    wire [ACT_BITS-1:0]    act_h  [0:ROWS*H-1];
    wire [WEIGHT_BITS-1:0] wgt_v  [0:(ROWS+1)*COLS-1];
    /* verilator lint_on UNUSEDSIGNAL */
    wire                   psum_valid_v [0:(ROWS+1)*COLS-1];
    wire [ACC_BITS-1:0]    psum_v       [0:(ROWS+1)*COLS-1];

    genvar r, c;
    generate
        for (r = 0; r < ROWS; r = r + 1) begin : g_row_skew
            delay_line #(.WIDTH(ACT_BITS), .DEPTH(r)) u_skew (
                .clk(clk), .rst(rst), .d(act_in[r*ACT_BITS +: ACT_BITS]), .q(act_h[r*H])
            );
        end

        for (c = 0; c < COLS; c = c + 1) begin : g_col_skew
            assign wgt_v[c] = wgt_in[c*WEIGHT_BITS +: WEIGHT_BITS];
            delay_line #(.WIDTH(ACC_BITS + 1), .DEPTH(c)) u_skew (
                .clk(clk), .rst(rst),
                .d({in_valid, psum_in[c*ACC_BITS +: ACC_BITS]}),
                .q({psum_valid_v[c], psum_v[c]})
            );
        end

        for (r = 0; r < ROWS; r = r + 1) begin : g_pe_row
            for (c = 0; c < COLS; c = c + 1) begin : g_pe
                ws_mac_pe #(
                    .WEIGHT_BITS(WEIGHT_BITS), .ACT_BITS(ACT_BITS), .ACT_SIGNED(ACT_SIGNED),
                    .ACC_BITS(ACC_BITS), .SATURATE(SATURATE)
                ) u_pe (
                    .clk(clk), .rst(rst),
                    .wgt_load(wgt_load), .wgt_in(wgt_v[r*COLS + c]),
                    .act_in(act_h[r*H + c]),
                    .psum_valid_in(psum_valid_v[r*COLS + c]), .psum_in(psum_v[r*COLS + c]),
                    .wgt(wgt_v[(r+1)*COLS + c]),
                    .act_out(act_h[r*H + c + 1]),
                    .psum_valid_out(psum_valid_v[(r+1)*COLS + c]), .psum_out(psum_v[(r+1)*COLS + c])
                );
            end
        end

        for (c = 0; c < COLS; c = c + 1) begin : g_port
            assign out_valid[c] = psum_valid_v[ROWS*COLS + c];
            assign out_acc[c*ACC_BITS +: ACC_BITS] = psum_v[ROWS*COLS + c];
        end
    endgenerate
endmodule
