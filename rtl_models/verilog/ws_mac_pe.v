`timescale 1ns / 1ps
// One processing element of the weight-stationary array. While `wgt_load` is high it takes
// the weight from the PE above (the column's load chain, bottom row first) and holds it
// otherwise. Every cycle it passes the activation arriving from the left on to the right;
// when a partial sum arrives from above (`psum_valid_in`) it adds weight * activation to
// it with the datapath's overflow rule (docs/datapath.md, Accumulation) and passes the sum
// down one cycle later. The partial sum entering the top of a column is the sum of the
// reduction indices before this fold, so each output still adds its products one at a
// time in the datapath's order t = 0..K-1, saturating steps included.
module ws_mac_pe #(
    parameter WEIGHT_BITS = 4,
    parameter ACT_BITS = 8,
    parameter ACT_SIGNED = 0,
    parameter ACC_BITS = 32,
    parameter SATURATE = 0
) (
    input  wire                   clk,
    input  wire                   rst,
    input  wire                   wgt_load,
    input  wire [WEIGHT_BITS-1:0] wgt_in,
    input  wire [ACT_BITS-1:0]    act_in,
    input  wire                   psum_valid_in,
    input  wire [ACC_BITS-1:0]    psum_in,
    output reg  [WEIGHT_BITS-1:0] wgt,
    output reg  [ACT_BITS-1:0]    act_out,
    output reg                    psum_valid_out,
    output reg  [ACC_BITS-1:0]    psum_out
);
    // An unsigned activation gets a zero sign bit, so one signed multiplier serves both.
    localparam PROD_BITS = WEIGHT_BITS + ACT_BITS + 1;
    localparam SUM_BITS = (ACC_BITS > PROD_BITS ? ACC_BITS : PROD_BITS) + 1;

    wire signed [ACT_BITS:0]    act_ext = {ACT_SIGNED ? act_in[ACT_BITS-1] : 1'b0, act_in};
    wire signed [PROD_BITS-1:0] product = $signed(wgt) * act_ext;
    /* verilator lint_off WIDTHEXPAND */  // sign extension of both terms is intended
    wire signed [SUM_BITS-1:0]  sum = $signed(psum_in) + product;
    /* verilator lint_on WIDTHEXPAND */
    wire        [ACC_BITS-1:0]  saturated;

    clamp #(.IN_BITS(SUM_BITS), .OUT_BITS(ACC_BITS), .OUT_SIGNED(1)) u_saturate (
        .value(sum), .clamped(saturated)
    );

    always @(posedge clk) begin
        if (rst) begin
            wgt <= {WEIGHT_BITS{1'b0}};
            act_out <= {ACT_BITS{1'b0}};
            psum_valid_out <= 1'b0;
            psum_out <= {ACC_BITS{1'b0}};
        end else begin
            if (wgt_load)
                wgt <= wgt_in;
            act_out <= act_in;
            psum_valid_out <= psum_valid_in;
            if (psum_valid_in)
                psum_out <= SATURATE ? saturated : sum[ACC_BITS-1:0];
        end
    end
endmodule
