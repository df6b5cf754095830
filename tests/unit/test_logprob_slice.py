"""The gradient-checkpointing forward scores completion positions only (lm_head + log-softmax after
slicing the hidden states): log-probs and gradients equal the unsliced path's within fp32 noise.

Tolerance (fp32): log-probs 1e-5 absolute (measured max |diff| 0.0 on the tiny Qwen3: the sliced head
multiplies the same hidden rows, only a summation order could differ); the delta_S gradient 1e-5 in
relative norm (measured 3.7e-7)."""
import copy

import pytest
import torch

from learner.batch import RolloutBatch
from learner.scoring import Scorer
from shared.adapter import adapter_modules, wrap_model
from shared.logprobs import token_logprobs
from shared.schemas import Completion, Grade, GradedGroup, RolloutGroup

torch.set_num_threads(1)
LOGP_ATOL = 1e-5
GRAD_REL = 1e-5


@pytest.fixture(scope="module")
def model(tiny_qwen3):
    m = copy.deepcopy(tiny_qwen3)
    wrap_model(m, progress=False)
    with torch.no_grad():  # a policy away from delta_S = 0
        for mod in adapter_modules(m).values():
            mod.delta_S.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    return m


def _batch(prompt_lens=(40, 7, 23), comp_lens=((5, 1, 9), (12, 3), (2, 2, 6))):
    gen = torch.Generator().manual_seed(1)
    groups = []
    for gi, (P, lens) in enumerate(zip(prompt_lens, comp_lens)):
        comps = [Completion(rollout_id=f"g{gi}-{i}", text="", token_ids=torch.randint(3, 200, (n,), generator=gen).tolist(),
                            logprobs=[0.0] * n) for i, n in enumerate(lens)]
        grades = [Grade(rollout_id=c.rollout_id, formatted=True, can_compile=True, gt_pass=False, pass_frac=0.0,
                        exploited={}, attempted={}, reward=float(i)) for i, c in enumerate(comps)]
        groups.append(GradedGroup(group=RolloutGroup(
            job_id=f"g{gi}", step=0, problem_id="p", policy_version=0,
            prompt_ids=torch.randint(3, 200, (P,), generator=gen).tolist(), completions=comps), grades=grades))
    b = RolloutBatch.from_groups(groups, 0)
    return b.micro(torch.arange(len(b)))


def test_sliced_head_matches_the_unsliced_forward(model):
    scorer = Scorer(model, pad_id=0, micro_batch=16, shared_prefix=False)
    mb = _batch()
    m = mb.mask.bool()
    with torch.no_grad():
        sliced = scorer.forward_full(mb)[0]
        full = scorer.forward_full(mb, slice_completions=False)[0]
    assert sliced.shape == full.shape == mb.mask.shape
    diff = float((sliced[m] - full[m]).abs().max())
    print(f"sliced vs unsliced log-probs: max |diff| = {diff:.3e} over {int(m.sum())} completion tokens")
    assert diff <= LOGP_ATOL
    assert float(full[m].abs().min()) > 0  # real log-probs, not padding


def test_sliced_head_gradients_match(model):
    scorer = Scorer(model, pad_id=0, micro_batch=16, shared_prefix=False)
    mb = _batch()
    params = [mod.delta_S for mod in adapter_modules(model).values()]
    grads = []
    for flag in (True, False):
        lp = scorer.forward_full(mb, slice_completions=flag)[0]
        g = torch.autograd.grad((lp * mb.mask).sum(), params)
        grads.append(torch.cat([x.reshape(-1) for x in g]))
    rel = float((grads[0] - grads[1]).norm() / grads[1].norm())
    assert rel <= GRAD_REL, rel  # measured 3.7e-7: the backward sums the head's gradient in another order
    assert float(grads[0].abs().max()) > 0


def test_positions_score_the_same_tokens_as_the_shifted_full_output(model):
    ids = torch.randint(3, 200, (2, 17), generator=torch.Generator().manual_seed(2))
    pos = torch.tensor([[3, 4, 15], [0, 9, 10]])
    with torch.no_grad():
        full = token_logprobs(model, ids)
        at = token_logprobs(model, ids, positions=pos)
    torch.testing.assert_close(at, full.gather(1, pos), rtol=0, atol=LOGP_ATOL)
