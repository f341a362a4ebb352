`timescale 1ns / 1ps
// Two's-complement IN_BITS value clamped to the range of an OUT_BITS signed or unsigned
// integer. Out-of-range detection looks only at the high bits, so it costs a few gates
// instead of two wide comparators; the accumulator's saturation and the requantizer's
// output clamp share it.
module clamp #(
    parameter IN_BITS = 34,
    parameter OUT_BITS = 32,
    parameter OUT_SIGNED = 1
) (
    input  wire [IN_BITS-1:0]  value,
    output wire [OUT_BITS-1:0] clamped
);
    wire negative = value[IN_BITS-1];
    generate
        if (OUT_SIGNED) begin : g_signed
            wire fits = value[IN_BITS-1:OUT_BITS-1] == {(IN_BITS-OUT_BITS+1){negative}};
            assign clamped = fits ? value[OUT_BITS-1:0] : {negative, {(OUT_BITS-1){~negative}}};
        end else begin : g_unsigned
            wire fits = value[IN_BITS-1:OUT_BITS] == {(IN_BITS-OUT_BITS){1'b0}};
            assign clamped = fits ? value[OUT_BITS-1:0] : {OUT_BITS{~negative}};
        end
    endgenerate
endmodule
