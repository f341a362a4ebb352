`timescale 1ns / 1ps
// ROWS x COLS output-stationary MAC array: the microarchitecture that
// accel_sim.timing.tile_compute_cycles describes (SCALE-Sim's "os" dataflow).
//
// GEMM tile: ROWS output rows (activation vectors a[r][0..K-1], one per output pixel) times
// COLS output columns (weight vectors w[c][0..K-1], one per output channel). In cycle t the
// driver presents element t of every row and column stream (t = 0..K-1, the datapath's
// accumulation order), with `in_first` at t = 0 and `in_last` at t = K-1; `acc_init` (one
// acc0 per column, already inside the accumulator range) stays stable while the tile runs.
// Skew registers delay row r by r cycles and column c by c cycles, so PE (r, c) accumulates
// element t in cycle t + r + c and holds output (r, c) in place.
//
// Outputs: PE (r, c) adds its last product in cycle K-1 + r + c, so the PEs of a column
// finish on consecutive cycles, top row first. Each column has one output port, a one-hot
// AND-OR selection of its PEs' accumulators by their "just finished" flags: in cycle
// K + r + c it carries row r (`out_valid[c]`, `out_row`, `out_acc`). There is no
// shift-out drain; the last output is on its port in cycle K + ROWS + COLS - 2.
module mac_array #(
    parameter ROWS = 4,
    parameter COLS = 4,
    parameter WEIGHT_BITS = 4,
    parameter ACT_BITS = 8,
    parameter ACT_SIGNED = 0,
    parameter ACC_BITS = 32,
    parameter SATURATE = 0,
    parameter ROW_BITS = ROWS > 1 ? $clog2(ROWS) : 1  // derived: width of a row index
) (
    input  wire                        clk,
    input  wire                        rst,
    input  wire                        in_valid,
    input  wire                        in_first,
    input  wire                        in_last,
    input  wire [ROWS*ACT_BITS-1:0]    act_in,
    input  wire [COLS*WEIGHT_BITS-1:0] wgt_in,
    input  wire [COLS*ACC_BITS-1:0]    acc_init,
    output wire [COLS-1:0]             out_valid,
    output wire [COLS*ROW_BITS-1:0]    out_row,
    output wire [COLS*ACC_BITS-1:0]    out_acc
);
    localparam H = COLS + 1;  // horizontal links per row: PE inputs plus the last PE's output

    // One net per link (not slices of one wide bus): simulators then wake only the PE
    // whose input changed, which keeps event-driven simulation linear in the array size.
    /* verilator lint_off UNUSEDSIGNAL */  // operands leaving the last column and row
    wire [ACT_BITS-1:0]    act_h   [0:ROWS*H-1];
    wire                   valid_h [0:ROWS*H-1];
    wire                   first_h [0:ROWS*H-1];
    wire                   last_h  [0:ROWS*H-1];
    wire [WEIGHT_BITS-1:0] wgt_v   [0:(ROWS+1)*COLS-1];
    /* verilator lint_on UNUSEDSIGNAL */
    wire [ACC_BITS-1:0]    acc     [0:ROWS*COLS-1];

    genvar r, c;
    generate
        for (r = 0; r < ROWS; r = r + 1) begin : g_row_skew
            delay_line #(.WIDTH(ACT_BITS + 3), .DEPTH(r)) u_skew (
                .clk(clk), .rst(rst),
                .d({in_last, in_first, in_valid, act_in[r*ACT_BITS +: ACT_BITS]}),
                .q({last_h[r*H], first_h[r*H], valid_h[r*H], act_h[r*H]})
            );
        end

        for (c = 0; c < COLS; c = c + 1) begin : g_col_skew
            delay_line #(.WIDTH(WEIGHT_BITS), .DEPTH(c)) u_skew (
                .clk(clk), .rst(rst),
                .d(wgt_in[c*WEIGHT_BITS +: WEIGHT_BITS]),
                .q(wgt_v[c])
            );
        end

        for (r = 0; r < ROWS; r = r + 1) begin : g_pe_row
            for (c = 0; c < COLS; c = c + 1) begin : g_pe
                mac_pe #(
                    .WEIGHT_BITS(WEIGHT_BITS), .ACT_BITS(ACT_BITS), .ACT_SIGNED(ACT_SIGNED),
                    .ACC_BITS(ACC_BITS), .SATURATE(SATURATE)
                ) u_pe (
                    .clk(clk), .rst(rst),
                    .in_valid(valid_h[r*H + c]), .in_first(first_h[r*H + c]), .in_last(last_h[r*H + c]),
                    .act_in(act_h[r*H + c]), .wgt_in(wgt_v[r*COLS + c]),
                    .acc_init(acc_init[c*ACC_BITS +: ACC_BITS]),
                    .out_valid(valid_h[r*H + c + 1]), .out_first(first_h[r*H + c + 1]),
                    .out_last(last_h[r*H + c + 1]),
                    .act_out(act_h[r*H + c + 1]), .wgt_out(wgt_v[(r+1)*COLS + c]),
                    .acc(acc[r*COLS + c])
                );
            end
        end

        for (c = 0; c < COLS; c = c + 1) begin : g_port
            // At most one PE of a column is done in any cycle, so the port is the OR of the
            // rows' accumulators, each masked by its done flag, chained row by row.
            for (r = 0; r < ROWS; r = r + 1) begin : g_row
                /* verilator lint_off WIDTHTRUNC */
                localparam [ROW_BITS-1:0] INDEX = r;
                /* verilator lint_on WIDTHTRUNC */
                // PE (r, c) added its last product in the previous cycle.
                wire                done = valid_h[r*H + c + 1] & last_h[r*H + c + 1];
                wire [ACC_BITS-1:0] masked = acc[r*COLS + c] & {ACC_BITS{done}};
                wire [ROW_BITS-1:0] index = INDEX & {ROW_BITS{done}};
                wire [ACC_BITS-1:0] any_acc;
                wire [ROW_BITS-1:0] any_row;
                wire                any_done;
                if (r == 0) begin : g_top
                    assign any_acc = masked;
                    assign any_row = index;
                    assign any_done = done;
                end else begin : g_below
                    assign any_acc = g_row[r-1].any_acc | masked;
                    assign any_row = g_row[r-1].any_row | index;
                    assign any_done = g_row[r-1].any_done | done;
                end
            end
            assign out_valid[c] = g_row[ROWS-1].any_done;
            assign out_row[c*ROW_BITS +: ROW_BITS] = g_row[ROWS-1].any_row;
            assign out_acc[c*ACC_BITS +: ACC_BITS] = g_row[ROWS-1].any_acc;
        end
    endgenerate
endmodule
