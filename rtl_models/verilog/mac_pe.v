`timescale 1ns / 1ps
// One processing element of the output-stationary array. It multiplies the activation
// arriving from the left by the weight arriving from above, adds the product to its own
// accumulator with the datapath's overflow rule (docs/datapath.md, Accumulation), and
// passes both operands on one cycle later. The flags travel with the activation: `first`
// starts a new sum from the column's initial value acc0, `last` marks the final product,
// so out_valid & out_last is high in exactly the cycle after the sum is complete.
module mac_pe #(
    parameter WEIGHT_BITS = 4,
    parameter ACT_BITS = 8,
    parameter ACT_SIGNED = 0,
    parameter ACC_BITS = 32,
    parameter SATURATE = 0
) (
    input  wire                   clk,
    input  wire                   rst,
    input  wire                   in_valid,
    input  wire                   in_first,
    input  wire                   in_last,
    input  wire [ACT_BITS-1:0]    act_in,
    input  wire [WEIGHT_BITS-1:0] wgt_in,
    input  wire [ACC_BITS-1:0]    acc_init,
    output reg                    out_valid,
    output reg                    out_first,
    output reg                    out_last,
    output reg  [ACT_BITS-1:0]    act_out,
    output reg  [WEIGHT_BITS-1:0] wgt_out,
    output reg  [ACC_BITS-1:0]    acc
);
    // An unsigned activation gets a zero sign bit, so one signed multiplier serves both.
    localparam PROD_BITS = WEIGHT_BITS + ACT_BITS + 1;
    localparam SUM_BITS = (ACC_BITS > PROD_BITS ? ACC_BITS : PROD_BITS) + 1;

    wire signed [ACT_BITS:0]      act_ext = {ACT_SIGNED ? act_in[ACT_BITS-1] : 1'b0, act_in};
    wire signed [PROD_BITS-1:0]   product = $signed(wgt_in) * act_ext;
    wire signed [ACC_BITS-1:0]    base = in_first ? acc_init : acc;
    /* verilator lint_off WIDTHEXPAND */  // sign extension of the product is intended
    wire signed [SUM_BITS-1:0]    sum = base + product;
    /* verilator lint_on WIDTHEXPAND */
    wire        [ACC_BITS-1:0]    saturated;
    wire        [ACC_BITS-1:0]    next_acc = SATURATE ? saturated : sum[ACC_BITS-1:0];

    clamp #(.IN_BITS(SUM_BITS), .OUT_BITS(ACC_BITS), .OUT_SIGNED(1)) u_saturate (
        .value(sum), .clamped(saturated)
    );

    always @(posedge clk) begin
        if (rst) begin
            out_valid <= 1'b0;
            out_first <= 1'b0;
            out_last <= 1'b0;
            act_out <= {ACT_BITS{1'b0}};
            wgt_out <= {WEIGHT_BITS{1'b0}};
            acc <= {ACC_BITS{1'b0}};
        end else begin
            out_valid <= in_valid;
            out_first <= in_first;
            out_last <= in_last;
            act_out <= act_in;
            wgt_out <= wgt_in;
            if (in_valid)
                acc <= next_acc;
        end
    end
endmodule
