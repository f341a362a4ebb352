`timescale 1ns / 1ps
// The weight-stationary accelerator tile: ws_mac_array with one requantization lane under
// each column, the same lanes as mac_tile's.
//
// Per-tile settings, stable while the tile runs: `acc_init` (acc0 per column), the requant
// parameters of each column's output channel, `first_fold` (this tile holds reduction
// indices 0..ROWS-1: each column starts from acc_init, not from `psum_in`) and
// `last_fold` (it holds the last ones: its sums are complete and are requantized). The
// partial sums of the other folds leave on `acc_*` only and come back, from the output
// buffer, as the next fold's `psum_in`. `res_in`, the residual operand of pixel m
// (one lane per column), is presented with the pixel's activations; a delay line per
// column brings it, and the fold's `last_fold`, to the requant lane in the cycle that
// pixel's sum leaves the array.
// Requantized outputs leave two cycles after their accumulators, on `y_*`.
module ws_mac_tile #(
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
    parameter OUT_SIGNED = 0
) (
    input  wire                         clk,
    input  wire                         rst,
    input  wire                         wgt_load,
    input  wire [COLS*WEIGHT_BITS-1:0]  wgt_in,
    input  wire                         in_valid,
    input  wire [ROWS*ACT_BITS-1:0]     act_in,
    input  wire [COLS*ACC_BITS-1:0]     psum_in,
    input  wire [COLS*RES_BITS-1:0]     res_in,
    input  wire                         first_fold,
    input  wire                         last_fold,
    input  wire [COLS*ACC_BITS-1:0]     acc_init,
    input  wire [COLS*MULT_BITS-1:0]    mult,
    input  wire [COLS*MULT_BITS-1:0]    res_mult,
    input  wire [COLS*SHIFT_BITS-1:0]   shift,
    input  wire [COLS*SHIFT_BITS-1:0]   res_shift,
    input  wire [COLS*OFFSET_BITS-1:0]  offset,
    input  wire [COLS*(OUT_BITS+1)-1:0] zero_point,
    output wire [COLS-1:0]              acc_valid,
    output wire [COLS*ACC_BITS-1:0]     acc_out,
    output wire [COLS-1:0]              y_valid,
    output wire [COLS*OUT_BITS-1:0]     y_out
);
    ws_mac_array #(
        .ROWS(ROWS), .COLS(COLS), .WEIGHT_BITS(WEIGHT_BITS), .ACT_BITS(ACT_BITS),
        .ACT_SIGNED(ACT_SIGNED), .ACC_BITS(ACC_BITS), .SATURATE(SATURATE)
    ) u_array (
        .clk(clk), .rst(rst),
        .wgt_load(wgt_load), .wgt_in(wgt_in),
        .in_valid(in_valid), .act_in(act_in),
        .psum_in(first_fold ? acc_init : psum_in),
        .out_valid(acc_valid), .out_acc(acc_out)
    );

    genvar c;
    generate
        for (c = 0; c < COLS; c = c + 1) begin : g_requant
            // The residual and the fold's `last_fold` travel with their pixel, so that the
            // next tile's settings (presented while this one's last sums still leave) do
            // not reach them.
            wire [RES_BITS-1:0] res;
            wire                requantize;
            delay_line #(.WIDTH(RES_BITS + 1), .DEPTH(ROWS + c)) u_pixel_delay (
                .clk(clk), .rst(rst),
                .d({last_fold, res_in[c*RES_BITS +: RES_BITS]}),
                .q({requantize, res})
            );
            /* verilator lint_off UNUSEDSIGNAL */  // the ws array names outputs by order, not by tag
            wire unused_tag;
            /* verilator lint_on UNUSEDSIGNAL */
            requant #(
                .ACC_BITS(ACC_BITS), .MULT_BITS(MULT_BITS), .RES_BITS(RES_BITS),
                .OFFSET_BITS(OFFSET_BITS), .SHIFT_BITS(SHIFT_BITS), .OUT_BITS(OUT_BITS),
                .OUT_SIGNED(OUT_SIGNED), .TAG_BITS(1)
            ) u_requant (
                .clk(clk), .rst(rst),
                .in_valid(acc_valid[c] & requantize),
                .in_tag(1'b0),
                .acc(acc_out[c*ACC_BITS +: ACC_BITS]),
                .res(res),
                .mult(mult[c*MULT_BITS +: MULT_BITS]),
                .res_mult(res_mult[c*MULT_BITS +: MULT_BITS]),
                .res_shift(res_shift[c*SHIFT_BITS +: SHIFT_BITS]),
                .shift(shift[c*SHIFT_BITS +: SHIFT_BITS]),
                .offset(offset[c*OFFSET_BITS +: OFFSET_BITS]),
                .zero_point(zero_point[c*(OUT_BITS+1) +: OUT_BITS+1]),
                .out_valid(y_valid[c]),
                .out_tag(unused_tag),
                .y(y_out[c*OUT_BITS +: OUT_BITS])
            );
        end
    endgenerate
endmodule
