"""GPU bench of the Triton ops of cai_fast.ops (issue 4): time, achieved TFLOP/s and memory
bandwidth against the device's measured ceilings, peak memory, and a check of every result
against the unfused reference.

    python benches/gpu_ops.py                 # bf16, the default model's and Llama-3-8B's heads
    python benches/gpu_ops.py --dtype fp32 --tokens 4096

Needs CUDA and triton (it stops with a message on a machine without them). The ceilings are
measured first: a large matmul in the bench dtype (TFLOP/s) and a large device-to-device copy
(GB/s, read + write). Each op is timed with triton.testing.do_bench (median, 20th and 80th
percentile) against torch unfused and, for the SFT loss, Liger-Kernel's fused linear
cross-entropy when `liger_kernel` imports. Achieved figures count the op's necessary work: the
matmul FLOPs (3 × 2·N·H·V for a loss forward + backward; the Triton path's extra recompute for
log-probs is not counted) and the bytes of its inputs and outputs read or written once.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

import cai_fast.ops as ops

HEADS = {"smollm2-135m": (576, 49152), "llama3-8b": (4096, 128256)}
OPTION_IDS = (330, 389)
PRINCIPLES = 4


def require_cuda() -> None:
    if not torch.cuda.is_available():
        sys.exit("benches/gpu_ops.py needs CUDA: no GPU is visible to torch here. On CPU, run "
                 "benches/bench_ops_cpu.py instead.")
    if not ops.HAS_TRITON:
        sys.exit("benches/gpu_ops.py needs triton: pip install triton")


def bench(fn, grad_to_none=None) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds of fn."""
    from triton.testing import do_bench

    return tuple(do_bench(fn, grad_to_none=grad_to_none, quantiles=[0.5, 0.2, 0.8]))


def peak_extra_mib(fn, leaves=()) -> float:
    """Peak CUDA memory fn allocates beyond what was allocated before it (the grads of `leaves`
    dropped first, so that the new gradients count), in MiB."""
    for t in leaves:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def ceilings(dtype) -> tuple[float, float]:
    """(TFLOP/s of an 8192³ matmul, GB/s of a 1 GiB copy) on this device."""
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=dtype) for _ in range(2))
    tflops = 2 * 8192**3 / (bench(lambda: a @ b)[0] * 1e-3) / 1e12
    src = torch.empty(2**30, device="cuda", dtype=torch.uint8)
    dst = torch.empty_like(src)
    gbps = 2 * src.numel() / (bench(lambda: dst.copy_(src))[0] * 1e-3) / 1e9
    return tflops, gbps


def _check(fast, reference, tol: float) -> str:
    """Worst relative error ‖got − want‖ / ‖want‖ over the results, and whether it is within tol."""
    worst = max(float((g.double() - w.double()).norm() / w.double().norm().clamp(min=1e-30))
                for g, w in zip(fast, reference))
    return f"{'ok' if worst <= tol else 'MISMATCH'} ({worst:.1e})"


def _head(tokens, head, dtype, seed=0):
    size, vocab = HEADS[head]
    gen = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(tokens, size, device="cuda", dtype=dtype, generator=gen)
    weight = torch.randn(vocab, size, device="cuda", dtype=dtype, generator=gen) * size**-0.5
    targets = torch.randint(0, vocab, (tokens,), device="cuda", generator=gen)
    return hidden.requires_grad_(True), weight.requires_grad_(True), targets


def _loss_and_grads(loss_fn, hidden, weight, targets):
    def step():
        hidden.grad = weight.grad = None
        loss = loss_fn(hidden, weight, targets)
        loss.backward()
        return loss.detach().float(), hidden.grad, weight.grad
    return step


def sft_loss_variants():
    variants = {
        "cai_fast triton": lambda h, w, t: ops.fused_linear_cross_entropy(h, w, t),
        "torch unfused": lambda h, w, t: F.cross_entropy((h @ w.T).float(), t),
    }
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        variants["liger-kernel"] = lambda h, w, t: liger(w, h, t)
    except ImportError as error:
        print(f"(liger_kernel not available: {error})")
    return variants


def bench_vocab_op(name, variants, tokens, head, dtype, tol, caps) -> list[str]:
    """Rows of the table for an op of hidden [N, H] and the head [V, H], forward + backward."""
    hidden, weight, targets = _head(tokens, head, dtype)
    size, vocab = HEADS[head]
    flops = 3 * 2 * tokens * size * vocab
    moved = (2 * tokens * size + 2 * vocab * size) * hidden.element_size()
    exact = [t.detach().float().requires_grad_(True) for t in (hidden, weight)]
    reference = _loss_and_grads(variants["torch unfused"], *exact, targets)()
    rows = []
    for variant, loss_fn in variants.items():
        step = _loss_and_grads(loss_fn, hidden, weight, targets)
        check = _check(step(), reference, tol)
        rows.append(_row(f"{name} {head}", variant, f"N={tokens} H={size} V={vocab}",
                         bench(step, [hidden, weight]), flops, moved, caps,
                         peak_extra_mib(step, [hidden, weight]), check))
    return rows


def bench_judge(head, dtype, tol, caps) -> list[str]:
    size, vocab = HEADS[head]
    hidden, weight, _ = _head(4096, head, dtype)
    pairs = hidden.detach().reshape(-1, PRINCIPLES, 2, size)
    weight = weight.detach()
    moved = (pairs.numel() + 2 * size) * pairs.element_size()
    reference = ops.swapped_pair_scores_reference(pairs.double(), weight.double(), OPTION_IDS)
    rows = []
    for variant, call in (("cai_fast triton", ops.swapped_pair_scores),
                          ("torch unfused", ops.swapped_pair_scores_reference)):
        with torch.no_grad():
            scores = call(pairs, weight, OPTION_IDS)
            ms = bench(lambda: call(pairs, weight, OPTION_IDS))
            peak = peak_extra_mib(lambda: call(pairs, weight, OPTION_IDS))
        rows.append(_row(f"judge {head}", variant, f"rows=4096 H={size} V={vocab}", ms,
                         2 * pairs.numel(), moved, caps, peak, _check(scores, reference, tol)))
    return rows


def bench_reward(dtype, tol, caps, pairs=4096, size=4096) -> list[str]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    h_c, h_r = (torch.randn(pairs, size, device="cuda", dtype=dtype, generator=gen)
                .requires_grad_(True) for _ in range(2))
    w = torch.randn(1, size, device="cuda", dtype=dtype, generator=gen) * size**-0.5
    w.requires_grad_(True)
    b = torch.zeros(1, device="cuda", dtype=dtype, requires_grad=True)
    p = torch.rand(pairs, device="cuda", generator=gen)
    leaves = [h_c, h_r, w, b]

    def step(fn):
        for t in leaves:
            t.grad = None
        loss, _, _ = fn(h_c, h_r, w, b, p)
        loss.backward()
        return [loss.detach().float()] + [t.grad.float() for t in leaves]

    exact = [t.detach().double().requires_grad_(True) for t in leaves]
    loss, _, _ = ops.reward_bt_loss_reference(*exact, p.double())
    loss.backward()
    reference = [loss.detach()] + [t.grad for t in exact]
    rows = []
    for variant, fn in (("cai_fast triton", ops.reward_bt_loss),
                        ("torch unfused", ops.reward_bt_loss_reference)):
        rows.append(_row("reward BT loss", variant, f"B={pairs} H={size}",
                         bench(lambda: step(fn), leaves),
                         3 * 2 * 2 * pairs * size, 4 * pairs * size * h_c.element_size(), caps,
                         peak_extra_mib(lambda: step(fn), leaves), _check(step(fn), reference, tol)))
    return rows


def _row(op, variant, shape, ms, flops, moved, caps, peak_mib, check) -> str:
    median, low, high = ms
    tflops, gbps = flops / (median * 1e-3) / 1e12, moved / (median * 1e-3) / 1e9
    return (f"| {op} | {variant} | {shape} | {median:.3f} ({low:.3f}–{high:.3f}) | "
            f"{tflops:.1f} ({100 * tflops / caps[0]:.0f}%) | {gbps:.0f} ({100 * gbps / caps[1]:.0f}%) | "
            f"{peak_mib:.0f} | {check} |")


def main() -> None:
    parser = argparse.ArgumentParser(description="GPU bench of cai_fast.ops")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--tokens", type=int, default=8192, help="rows of the SFT / log-prob cases")
    args = parser.parse_args()
    require_cuda()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-4  # relative error of every result
    caps = ceilings(dtype)
    print(f"{torch.cuda.get_device_name()}: measured ceilings {caps[0]:.0f} TFLOP/s ({args.dtype} "
          f"matmul), {caps[1]:.0f} GB/s (copy)\n")
    print("| op | variant | shape | ms median (p20–p80) | TFLOP/s (% of ceiling) | GB/s (% of ceiling) "
          "| peak extra MiB | check vs reference |\n|---|---|---|---|---|---|---|---|")
    logprob_variants = {"cai_fast triton": lambda h, w, t: ops.linear_logprobs(h, w, t).sum(),
                        "torch unfused": lambda h, w, t: ops.linear_logprobs_reference(h, w, t).sum()}
    for head in HEADS:
        rows = bench_vocab_op("SFT loss", sft_loss_variants(), args.tokens, head, dtype, tol, caps)
        rows += bench_vocab_op("log-probs", logprob_variants, args.tokens, head, dtype, tol, caps)
        for row in rows + bench_judge(head, dtype, tol, caps):
            print(row, flush=True)
    for row in bench_reward(dtype, tol, caps):
        print(row, flush=True)


if __name__ == "__main__":
    main()
