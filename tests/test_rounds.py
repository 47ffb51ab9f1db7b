"""The device round (modes "device" and "graph"): token-identical to HF greedy and to the host round with
the same drafts (every round commits what the host round commits), EOS and max_new_tokens inside a round,
the shipped path (a draft head, the tree_attention op in bf16), no host sync inside a round, and a CUDA
graph replay equal to the eager round."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

import jetspec
from jetspec.runtime import ROUND_PHASES, DeviceRound, Drafter, HeadDrafter, OracleDrafter, Target
from jetspec.runtime.budget import TreeShape
from jetspec.ops import build_tree

from conftest import HAS_CUDA, requires_cuda
from test_generator import greedy_sequence, hf_greedy, mid_round_eos, random_head, random_prompt
from test_generator import qwen3 as cpu_qwen3

#: the device modes on this machine (the device round runs eagerly on CPU too)
MODES = ["device"] + (["graph"] if HAS_CUDA else [])
DEVICE = "cuda" if HAS_CUDA else "cpu"


@functools.cache
def qwen3(gqa: bool):
    """test_generator's target on DEVICE (a copy: the CPU tests share theirs)."""
    return copy.deepcopy(cpu_qwen3(gqa)).to(DEVICE)


class TableOracle(Drafter):
    """Fixed candidates for every committed length n, drawn once from the greedy sequence ``seq``: per depth
    the true token at rank 0 (log-prob -0.05, the rest from -3 down; ``rank0``) or, ``noisy``, at a random
    rank of random descending log-probs or (30%) absent. The host round (propose) and the device round
    (draft_at: an index on the device) read the same table, so both see the same drafts."""

    on_device = True

    def __init__(self, seq, *, depth, width, vocab, mode="rank0", seed=0):
        g = torch.Generator().manual_seed(seed)
        self.depth = depth
        length = len(seq)
        self.ids = torch.zeros(length, depth, width, dtype=torch.long)
        self.logprobs = torch.zeros(length, depth, width)
        for n in range(length):
            for d in range(depth):
                true = seq[n + d + 1] if n + d + 1 < length else 0
                others = [t for t in torch.randperm(vocab, generator=g).tolist() if t != true]
                row = [true] + others[:width - 1]
                if mode == "rank0":
                    scores = [-0.05] + [-3.0 - 0.5 * r for r in range(width - 1)]
                else:
                    scores = sorted((-4 * torch.rand(width, generator=g)).tolist(), reverse=True)
                    r = int(torch.randint(0, width, (1,), generator=g))
                    row[0], row[r] = row[r], row[0]
                    if float(torch.rand(1, generator=g)) < 0.3:
                        row[r] = others[width]
                self.ids[n, d] = torch.tensor(row)
                self.logprobs[n, d] = torch.tensor(scores)
        self.n = 0

    def start(self, tapped, capacity):
        self.ids, self.logprobs = self.ids.to(tapped.device), self.logprobs.to(tapped.device)
        self.n = tapped.shape[1]

    def extend(self, tapped):
        self.n += tapped.shape[1]

    def propose(self, anchor, width):
        return self.logprobs[self.n:self.n + 1, :, :width], self.ids[self.n:self.n + 1, :, :width]

    def draft_at(self, anchor, length):
        return length.clamp(max=self.ids.shape[0] - 1)  # rounds run ahead of the table's end are discarded

    def candidates_at(self, drafted, width):
        return self.logprobs[drafted, :, :width], self.ids[drafted, :, :width]

    def extend_at(self, tapped, length):
        pass


def generate(model, drafter, mode, prompt, new, **kwargs):
    gen = jetspec.SpeculativeGenerator(model, drafter, mode=mode, **kwargs)
    return gen, gen.generate(prompt, max_new_tokens=new, eos_token_id=[])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("oracle_mode,depth,width,budget", [("rank0", 6, 1, 7), ("rank0", 6, 2, 13),
                                                            ("rank0", 15, 3, 256), ("noisy", 7, 2, 16),
                                                            ("noisy", 7, 8, 64), ("noisy", 5, 3, 40)])
def test_same_rounds_as_the_host_round(mode, oracle_mode, depth, width, budget):
    model = qwen3(True)
    prompt = random_prompt(model, 20, seed=budget).to(DEVICE)
    new = 48
    seq = greedy_sequence(model, prompt, new + 2 * depth + 4)
    runs = {}
    for m in ("host", mode):
        oracle = TableOracle(seq, depth=depth, width=width, vocab=256, mode=oracle_mode, seed=budget)
        _, runs[m] = generate(model, oracle, m, prompt, new, budget=budget, width=width)
    host, device = runs["host"], runs[mode]
    assert device.sequences.tolist() == host.sequences.tolist() == [seq[:20 + new]]
    assert device.stats.accept_lengths == host.stats.accept_lengths
    assert max(device.stats.accept_lengths) > 1
    assert device.stats.new_tokens == new


@pytest.mark.parametrize("mode", ["host"] + MODES)
def test_oracle_drafter_commits_whole_chains(mode):
    """The package's OracleDrafter (the benchmarks' upper bound), on the host and on the device."""
    model = qwen3(False)
    prompt = random_prompt(model, 17, seed=4).to(DEVICE)
    seq = greedy_sequence(model, prompt, 40 + 8)
    for budget, width in ((7, 1), (25, 4)):
        oracle = OracleDrafter(seq[17:], depth=6, vocab_size=128)
        _, out = generate(model, oracle, mode, prompt, 40, budget=budget, width=width)
        assert out.sequences[0].tolist() == seq[:17 + 40]
        assert out.stats.accept_lengths[:-1] == [7] * (out.stats.rounds - 1)


@pytest.mark.parametrize("mode", MODES)
def test_random_heads_and_plain_decoding(mode):
    """Draft heads (causal and bidirectional, GQA or not) and budget 1 (no drafter): HF greedy tokens."""
    for case, (gqa, causal, budget, width, block) in enumerate([(True, True, 16, 2, 8), (False, False, 64, 8, 4),
                                                                (True, False, 3, 1, 16), (False, True, 1, 1, 4)]):
        model = qwen3(gqa)
        prompt = random_prompt(model, 9 + 30 * case, seed=case).to(DEVICE)
        head = random_head(model, layers=2, block=block, causal=causal, seed=case) if budget > 1 else None
        _, out = generate(model, head, mode, prompt, 30, budget=budget, width=width)
        assert out.sequences.tolist() == hf_greedy(model, prompt, 30).tolist()


@pytest.mark.parametrize("mode", MODES)
def test_eos_and_max_new_tokens_inside_a_round(mode):
    model = qwen3(True)
    prompt = random_prompt(model, 12, seed=5).to(DEVICE)
    depth = 5
    seq = greedy_sequence(model, prompt, 64)
    j, eos = mid_round_eos(seq[12:12 + 50], depth + 1)
    gen = jetspec.SpeculativeGenerator(model, TableOracle(seq, depth=depth, width=1, vocab=256), budget=depth + 1,
                                       width=1, mode=mode)
    out = gen.generate(prompt, max_new_tokens=50, eos_token_id=eos)
    assert out.sequences.tolist() == hf_greedy(model, prompt, 50, eos=eos).tolist()
    assert out.stats.new_tokens == j + 1 and out.stats.rounds == (j - 1) // (depth + 1) + 1
    for new in (1, 2, 7, 23):  # the same generator (and graph) again, cut by max_new_tokens
        out = gen.generate(prompt, max_new_tokens=new, eos_token_id=[])
        assert out.sequences[0].tolist() == seq[:12 + new]
        assert out.stats.rounds == -(-(new - 1) // (depth + 1))


def test_mode_errors():
    model = qwen3(True)
    head = random_head(model, layers=1, block=8, causal=True, seed=0)

    class HostOnly(Drafter):
        depth = 3

        def start(self, tapped, capacity): ...

        def extend(self, tapped): ...

        def propose(self, anchor, width): ...

    with pytest.raises(ValueError, match="mode must be one of"):
        jetspec.SpeculativeGenerator(model, head, mode="fast")
    with pytest.raises(ValueError, match="runs with mode='host'"):
        jetspec.SpeculativeGenerator(model, HostOnly(), budget=4, mode="device")
    with pytest.raises(ValueError, match="profile"):
        jetspec.SpeculativeGenerator(model, head, mode="graph", profile=True)
    if not HAS_CUDA:
        with pytest.raises(ValueError, match="CUDA"):
            jetspec.SpeculativeGenerator(model, head, mode="graph")
    # defaults: the host round on CPU and for fp32 models
    assert jetspec.SpeculativeGenerator(model, head).mode == "host"
    assert jetspec.SpeculativeGenerator(model, HostOnly(), budget=4).mode == "host"


def test_profiled_device_round_times_every_phase():
    model = qwen3(True)
    prompt = random_prompt(model, 10, seed=1).to(DEVICE)
    head = random_head(model, layers=1, block=8, causal=True, seed=1)
    gen = jetspec.SpeculativeGenerator(model, head, budget=16, width=2, mode="device", profile=True)
    out = gen.generate(prompt, max_new_tokens=12)
    assert out.sequences.tolist() == hf_greedy(model, prompt, 12).tolist()
    assert all(out.stats.phase_seconds[p] > 0 for p in ("prefill",) + ROUND_PHASES)


def test_rewound_rounds_leave_the_state_as_it_was():
    """What graph capture's warm-up relies on: rounds run inside rewound() change nothing the next round sees."""
    model = qwen3(True)
    target = Target(model)
    head = random_head(model, layers=1, block=8, causal=True, seed=4)
    prompt = random_prompt(model, 20, seed=4).to(DEVICE)
    results = []
    for warm_up in (False, True):
        rounds = DeviceRound(target, HeadDrafter(head, target), depth=7, widest=2, capacity=1024)
        shape = TreeShape(16, 2)
        rounds.prefill(prompt)
        if warm_up:
            with rounds.rewound():
                rounds.step(shape)
                rounds.step(shape)
            assert int(rounds.n) == 20
        rounds.step(shape)
        rounds.step(shape)
        results.append((rounds.result.tolist(), int(rounds.n), int(rounds.anchor)))
    assert results[0] == results[1]


@pytest.mark.parametrize("causal", [True, False])
def test_draft_step_compiles_to_one_graph(causal):
    """The device round's draft step (the head over its cached context, top-K, build_tree) traces without a
    graph break under torch.compile (fullgraph) and gives the eager step's tree."""
    model = qwen3(True)
    target = Target(model)
    drafter = HeadDrafter(random_head(model, layers=2, block=8, causal=causal, seed=3), target)
    cache = target.new_cache(1, 256)
    logits, tapped = target.prefill(random_prompt(model, 30, seed=3).to(DEVICE), cache, drafter.tap_layers)
    drafter.start(tapped, cache.capacity)
    anchor, n = logits[:, -1].argmax(-1), torch.tensor([30], device=DEVICE)

    def draft_step(anchor, n):
        logprobs, ids = drafter.candidates_at(drafter.draft_at(anchor, n), 4)
        return build_tree(logprobs, ids, anchor, n, 32)

    # aot_eager traces what inductor would (fake impls, no graph break) and keeps the eager kernels, so the
    # trees compare exactly (test_draft_topk compiles the op with inductor on CUDA).
    compiled = torch.compile(draft_step, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(anchor, n), draft_step(anchor, n)):
        assert torch.equal(got, want)


# ------------------------------------------------------------------ CUDA: the shipped path, syncs, graphs


def bf16_pair():
    from test_verify_attention import qwen3_model
    model = qwen3_model(128, torch.bfloat16, torch.device("cuda"))
    torch.manual_seed(3)
    head = jetspec.DraftHead(jetspec.heads.head_config_for(model.config, num_layers=1, block_size=8, causal=True,
                                                           mask_token_id=159))
    return model, head


@requires_cuda
def test_graph_is_the_default_and_equals_the_eager_device_round():
    """bf16, head_dim 128: the op in verify and in the head; graph replays give the eager round's tokens."""
    model, head = bf16_pair()
    prompt = torch.randint(0, 159, (1, 40), generator=torch.Generator().manual_seed(1)).cuda()
    gen = jetspec.SpeculativeGenerator(model, head, budget=32, width=4)
    assert gen.mode == "graph"
    graphed = gen.generate(prompt, max_new_tokens=64, eos_token_id=[])
    eager = jetspec.SpeculativeGenerator(model, head, budget=32, width=4, mode="device").generate(
        prompt, max_new_tokens=64, eos_token_id=[])
    assert graphed.sequences.tolist() == eager.sequences.tolist()
    assert graphed.stats.accept_lengths == eager.stats.accept_lengths


@requires_cuda
def test_no_host_sync_inside_a_round():
    """Every phase of the eager device round under torch's sync debug mode "error" (a sync raises), and
    CUDA-runtime calls of graph replays in the profiler: kernel launches and no synchronisation."""
    model, head = bf16_pair()
    target = Target(model)
    rounds = DeviceRound(target, HeadDrafter(head, target), depth=7, widest=4, capacity=1024)
    shape = TreeShape(32, 4)
    rounds.prefill(torch.randint(0, 159, (1, 40), generator=torch.Generator().manual_seed(2)).cuda())
    rounds.step(shape)  # first calls (lazy init, allocator growth) outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            rounds.step(shape)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        rounds.step(shape)
    torch.cuda.synchronize()
    # CPU activity only: tracing CUDA activity makes the profiler synchronise itself.
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            graph.replay()
    names = [e.name for e in prof.events()]
    assert names.count("cudaGraphLaunch") == 5
    assert not [n for n in names if "Synchronize" in n or n in ("cudaMemcpy", "cudaMemset")]
