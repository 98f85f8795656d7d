"""Measured plans of the fused_draft_input Triton backend per GPU architecture.

Each row is one ``best`` entry of ``bench/sweep_fused_draft_input.py`` (kernel-only time, every
candidate checked against the reference): ``(hidden, segments, dtype, rows, plan name)``. A call with
``rows`` tokens takes the plan of the smallest listed row count >= rows (else the largest) when its
``(hidden, segments, dtype)`` is listed for its GPU's compute capability; other shapes use the shape
heuristic. ``EAGLE_KERNELS_FDI_TUNING`` (a sweep result file) takes precedence where it has the shape.
"""

from __future__ import annotations

# sm_90, measured on an NVIDIA H200 (2026-11-26, commit 74abe79, torch 2.11, triton 3.6);
# bench/results/sweep_fused_draft_input_NVIDIA-H200.json. The heuristic's tiles were 1.5x slower
# than these at 1 row of H = 4096 (39.9 vs 26.5 us); cuBLAS (gather_mm) wins from 64 rows and at H = 8192.
# The 1-row entries are the GEMV path since an NVIDIA H100 run (2026-11-26, commit 988181b;
# sweep_fused_draft_input_NVIDIA-H100-80GB-HBM3.json): as fast as the best tensor-core plan there
# (kernel times in the comments, H100) and one launch without a split-K workspace, so an eager call
# costs about half (H 4096: 77 vs 140 us).
# The 16-row entries of H 4096 and 8192 are one-launch plans (split-K 1: no workspace, no reduction
# launch) since the quiet H100 run of session 22 (sweep_fused_draft_input_NVIDIA-H100-80GB-HBM3_s22.json,
# kernel / eager us): they were the best kernel time there and within 1% of it on the H200 (2026-11-26),
# while an eager call cost 1.3-2.9x less. Figures in those comments: H100 s22 / H200 2026-11-26. (Session
# 21's H200 sweep gave the H 8192 plan 66.7 us against gather_mm's 68.3. It did not try the H 4096 one, and
# gave the split-K 2 plan replaced there 22.5 us, 12% under the next candidate: the next GPU run re-checks.)
SM90 = (
    (4096, 2, "bf16", 1, "gemv:bm1_bn8_bk512_w4_st3"),  # H100 34.6 us (split-K 4 fused: 35.1), unfused 41.4
    # 28.0 / 26.5 us, eager 92 / 94 us; the split-K 2 plan before it: 28.8 / 26.3 us, eager 271 / 164 us
    (4096, 2, "bf16", 16, "fused:bm16_bn16_bk512_gm8_sk1_w4_st3"),
    (4096, 2, "bf16", 64, "gather_mm"),  # 28.3 us, unfused 30.4 us
    (4096, 2, "bf16", 512, "gather_mm"),  # 51.8 us, unfused 55.4 us
    (4096, 2, "bf16", 4096, "gather_mm"),  # 380.1 us, unfused 382.6 us
    (8192, 2, "bf16", 1, "gemv:bm1_bn8_bk512_w4_st3"),  # H100 102.3 us (gather_mm 103.7), unfused 107.3
    # 92.7 / 73.4 us, eager 180 / 162 us; gather_mm (two launches) before it: 95.2 / 72.8, eager 234 / 223
    (8192, 2, "bf16", 16, "fused:bm16_bn32_bk256_gm8_sk1_w4_st4"),
    (8192, 2, "bf16", 64, "gather_mm"),  # 78.4 us, unfused 80.2 us
    (8192, 2, "bf16", 512, "gather_mm"),  # 183.4 us, unfused 184.7 us
    (8192, 2, "bf16", 4096, "gather_mm"),  # 1437.4 us, unfused 1428.7 us
    (4096, 3, "bf16", 1, "gemv:bm1_bn8_bk1024_w8_st3"),  # H100 46.7 us (split-K 4 fused: 46.9), unfused 48.0
    (4096, 3, "bf16", 16, "fused:bm16_bn32_bk256_gm8_sk1_w4_st4"),  # 34.4 us, unfused 37.3 us
    (4096, 3, "bf16", 64, "gather_mm"),  # 40.1 us, unfused 40.0 us
    (4096, 3, "bf16", 512, "gather_mm"),  # 73.6 us, unfused 73.8 us
    (4096, 3, "bf16", 4096, "gather_mm"),  # 581.0 us, unfused 552.3 us
)

BY_CAPABILITY = {(9, 0): SM90}
