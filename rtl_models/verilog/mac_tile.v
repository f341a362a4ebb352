`timescale 1ns / 1ps
// The accelerator tile: the MAC array with one requantization lane under each column.
//
// Per-tile settings, stable while the tile runs: `acc_init` (acc0 per column), the requant
// parameters of each column's output channel, and `res_in`, the residual operand of every
// output (row-major, ROWS x COLS; zero where the layer has no shortcut). The raw
// accumulators leave on `acc_*` (as the array drains them) and the requantized outputs two
// cycles later on `y_*`; both name the row each value belongs to.
module mac_tile #(
    parameter ROWS = 4,
    parameter COLS = 4,
    parameter WEIGHT_BITS = 4,
    parameter ACT_BITS = 8,
    parameter ACT_SIGNED = 0,
    parameter ACC_BITS = 32,
    parameter SATURATE = 0,
    parameter MULT_BITS = 16,
    parameter RES_BITS = 9,
    parameter OFFSET_BITS = 61,
    parameter SHIFT_BITS = 6,
    parameter OUT_BITS = 8,
    parameter OUT_SIGNED = 0,
    parameter ROW_BITS = ROWS > 1 ? $clog2(ROWS) : 1  // derived: width of a row index
) (
    input  wire                          clk,
    input  wire                          rst,
    input  wire                          in_valid,
    input  wire                          in_first,
    input  wire                          in_last,
    input  wire [ROWS*ACT_BITS-1:0]      act_in,
    input  wire [COLS*WEIGHT_BITS-1:0]   wgt_in,
    input  wire [COLS*ACC_BITS-1:0]      acc_init,
    input  wire [COLS*MULT_BITS-1:0]     mult,
    input  wire [COLS*MULT_BITS-1:0]     res_mult,
    input  wire [COLS*SHIFT_BITS-1:0]    shift,
    input  wire [COLS*SHIFT_BITS-1:0]    res_shift,
    input  wire [COLS*OFFSET_BITS-1:0]   offset,
    input  wire [COLS*(OUT_BITS+1)-1:0]  zero_point,
    input  wire [ROWS*COLS*RES_BITS-1:0] res_in,
    output wire [COLS-1:0]               acc_valid,
    output wire [COLS*ROW_BITS-1:0]      acc_row,
    output wire [COLS*ACC_BITS-1:0]      acc_out,
    output wire [COLS-1:0]               y_valid,
    output wire [COLS*ROW_BITS-1:0]      y_row,
    output wire [COLS*OUT_BITS-1:0]      y_out
);
    mac_array #(
        .ROWS(ROWS), .COLS(COLS), .WEIGHT_BITS(WEIGHT_BITS), .ACT_BITS(ACT_BITS),
        .ACT_SIGNED(ACT_SIGNED), .ACC_BITS(ACC_BITS), .SATURATE(SATURATE)
    ) u_array (
        .clk(clk), .rst(rst),
        .in_valid(in_valid), .in_first(in_first), .in_last(in_last),
        .act_in(act_in), .wgt_in(wgt_in), .acc_init(acc_init),
        .out_valid(acc_valid), .out_row(acc_row), .out_acc(acc_out)
    );

    genvar c;
    generate
        for (c = 0; c < COLS; c = c + 1) begin : g_requant
            wire [ROW_BITS-1:0] row = acc_row[c*ROW_BITS +: ROW_BITS];
            requant #(
                .ACC_BITS(ACC_BITS), .MULT_BITS(MULT_BITS), .RES_BITS(RES_BITS),
                .OFFSET_BITS(OFFSET_BITS), .SHIFT_BITS(SHIFT_BITS), .OUT_BITS(OUT_BITS),
                .OUT_SIGNED(OUT_SIGNED), .TAG_BITS(ROW_BITS)
            ) u_requant (
                .clk(clk), .rst(rst),
                .in_valid(acc_valid[c]),
                .in_tag(row),
                .acc(acc_out[c*ACC_BITS +: ACC_BITS]),
                .res(res_in[(row*COLS + c)*RES_BITS +: RES_BITS]),
                .mult(mult[c*MULT_BITS +: MULT_BITS]),
                .res_mult(res_mult[c*MULT_BITS +: MULT_BITS]),
                .res_shift(res_shift[c*SHIFT_BITS +: SHIFT_BITS]),
                .shift(shift[c*SHIFT_BITS +: SHIFT_BITS]),
                .offset(offset[c*OFFSET_BITS +: OFFSET_BITS]),
                .zero_point(zero_point[c*(OUT_BITS+1) +: OUT_BITS+1]),
                .out_valid(y_valid[c]),
                .out_tag(y_row[c*ROW_BITS +: ROW_BITS]),
                .y(y_out[c*OUT_BITS +: OUT_BITS])
            );
        end
    endgenerate
endmodule
