`timescale 1ns / 1ps
// A DEPTH-stage register chain (DEPTH = 0 is a wire). The array uses it to skew operand
// entry so that row i and column j see element t of their streams at cycle t + i + j.
module delay_line #(
    parameter WIDTH = 8,
    parameter DEPTH = 1
) (
    /* verilator lint_off UNUSEDSIGNAL */  // a zero-depth line has no registers
    input  wire             clk,
    input  wire             rst,
    /* verilator lint_on UNUSEDSIGNAL */
    input  wire [WIDTH-1:0] d,
    output wire [WIDTH-1:0] q
);
    wire [WIDTH-1:0] tap [0:DEPTH];
    assign tap[0] = d;
    assign q = tap[DEPTH];

    genvar k;
    generate
        for (k = 0; k < DEPTH; k = k + 1) begin : g_stage
            reg [WIDTH-1:0] stage;
            always @(posedge clk) stage <= rst ? {WIDTH{1'b0}} : tap[k];
            assign tap[k + 1] = stage;
        end
    endgenerate
endmodule
