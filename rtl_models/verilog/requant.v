`timescale 1ns / 1ps
// The requantization stage of docs/datapath.md for one output channel, two pipeline stages:
//   v = acc * mult + (res * res_mult) << res_shift + offset       (exact)
//   y = clamp((v + 2**(shift-1)) >> shift + zero_point)           (half_up, then clamp)
// `res` is the residual operand R - zp_R (zero for option-A padded channels); the rounding
// term is (1 << shift) >> 1, which is 0 for shift = 0. V_BITS holds the widest product, the
// offset and the rounding term with three bits to spare, and at least 64 bits: the IR keeps
// the worst case of |v|, the shifted residual term included, below its requantization bound
// 2**61 (docs/datapath.md; accel_sim.ir.REQUANT_BOUND).
// A TAG (the output row) travels alongside so that the caller knows which output leaves.
// Registers load only on valid data: idle lanes hold their last value (no X, no toggling).
module requant #(
    parameter ACC_BITS = 32,
    parameter MULT_BITS = 16,
    parameter RES_BITS = 9,
    parameter OFFSET_BITS = 61,
    parameter SHIFT_BITS = 6,
    parameter OUT_BITS = 8,
    parameter OUT_SIGNED = 0,
    parameter TAG_BITS = 1
) (
    input  wire                   clk,
    input  wire                   rst,
    input  wire                   in_valid,
    input  wire [TAG_BITS-1:0]    in_tag,
    input  wire [ACC_BITS-1:0]    acc,
    input  wire [RES_BITS-1:0]    res,
    input  wire [MULT_BITS-1:0]   mult,
    input  wire [MULT_BITS-1:0]   res_mult,
    input  wire [SHIFT_BITS-1:0]  res_shift,
    input  wire [SHIFT_BITS-1:0]  shift,
    input  wire [OFFSET_BITS-1:0] offset,
    input  wire [OUT_BITS:0]      zero_point,
    output reg                    out_valid,
    output reg  [TAG_BITS-1:0]    out_tag,
    output reg  [OUT_BITS-1:0]    y
);
    localparam ACC_TERM = ACC_BITS + MULT_BITS;
    localparam RES_TERM = RES_BITS + MULT_BITS;
    localparam WIDEST_12 = ACC_TERM > RES_TERM ? ACC_TERM : RES_TERM;
    localparam WIDEST_123 = WIDEST_12 > OFFSET_BITS ? WIDEST_12 : OFFSET_BITS;
    localparam WIDEST = WIDEST_123 > (1 << SHIFT_BITS) ? WIDEST_123 : (1 << SHIFT_BITS);
    localparam V_BITS = WIDEST + 3 > 64 ? WIDEST + 3 : 64;

    // Stage 1: the exact multiply-add.
    /* verilator lint_off WIDTHEXPAND */  // every term is sign-extended to V_BITS
    wire signed [V_BITS-1:0] res_term = ($signed(res) * $signed(res_mult)) <<< res_shift;
    /* verilator lint_on WIDTHEXPAND */
    reg                    v_valid;
    reg [TAG_BITS-1:0]     v_tag;
    reg signed [V_BITS-1:0] v;
    always @(posedge clk) begin
        if (rst) begin
            v_valid <= 1'b0;
            v_tag <= {TAG_BITS{1'b0}};
            v <= {V_BITS{1'b0}};
        end else begin
            v_valid <= in_valid;
            if (in_valid) begin
                v_tag <= in_tag;
                /* verilator lint_off WIDTHEXPAND */  // every term is sign-extended to V_BITS
                v <= $signed(acc) * $signed(mult) + res_term + $signed(offset);
                /* verilator lint_on WIDTHEXPAND */
            end
        end
    end

    // Stage 2: round half up, shift, add the output zero point, clamp.
    wire        [V_BITS-1:0] one = {{(V_BITS-1){1'b0}}, 1'b1};
    wire signed [V_BITS-1:0] half = (one << shift) >> 1;
    wire signed [V_BITS-1:0] shifted = (v + half) >>> shift;
    /* verilator lint_off WIDTHEXPAND */
    wire signed [V_BITS-1:0] with_zero_point = shifted + $signed(zero_point);
    /* verilator lint_on WIDTHEXPAND */
    wire        [OUT_BITS-1:0] clamped;

    clamp #(.IN_BITS(V_BITS), .OUT_BITS(OUT_BITS), .OUT_SIGNED(OUT_SIGNED)) u_clamp (
        .value(with_zero_point), .clamped(clamped)
    );

    always @(posedge clk) begin
        if (rst) begin
            out_valid <= 1'b0;
            out_tag <= {TAG_BITS{1'b0}};
            y <= {OUT_BITS{1'b0}};
        end else begin
            out_valid <= v_valid;
            if (v_valid) begin
                out_tag <= v_tag;
                y <= clamped;
            end
        end
    end
endmodule
