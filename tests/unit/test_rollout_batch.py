"""RolloutBatch: built once from graded groups; its vectorised advantages equal the literal per-group loop."""
import pytest
import torch

from learner.batch import BatchError, RolloutBatch
from learner.grpo import group_advantages
from shared.schemas import Completion, Grade, GradedGroup, RolloutGroup

torch.set_num_threads(1)


def _grade(rid, reward, gt=False, hack=""):
    return Grade(rollout_id=rid, formatted=True, can_compile=True, gt_pass=gt, pass_frac=float(gt),
                 exploited={m: m in hack for m in "ABCD"}, attempted={m: m in hack for m in "ABCD"}, reward=reward)


def _group(job, lengths, rewards, version=0, prompt=(5, 6, 7), shuffle=False, logprobs=True):
    comps = [Completion(rollout_id=f"{job}-{i}", text="x", token_ids=list(range(10, 10 + n)),
                        logprobs=[-0.1 * (i + 1)] * n if logprobs else [], finish_reason="stop")
             for i, n in enumerate(lengths)]
    grades = [_grade(c.rollout_id, r, gt=r > 2, hack="A" if r == 1 else "") for c, r in zip(comps, rewards)]
    if shuffle:
        grades = grades[::-1]
    g = RolloutGroup(job_id=job, step=0, problem_id="p", policy_version=version, prompt_ids=list(prompt),
                     completions=comps)
    return GradedGroup(group=g, grades=grades)


def reference_advantages(groups, loss_type, eps, penalty=None):
    """The learner's advantages before RolloutBatch, literally: one [1, G] call per group, python floats."""
    adv, keep, i = [], [], 0
    for gg in groups:
        rs = []
        for g in sorted(gg.grades, key=lambda g: g.rollout_id):
            rs.append(float(g.reward) - (penalty[i] if penalty is not None else 0.0))
            i += 1
        a, k = group_advantages(torch.tensor([rs]), loss_type, eps)
        adv += a[0].tolist()
        keep.append(bool(k[0]))
    return torch.tensor(adv), keep


def test_fields_from_groups():
    groups = [_group("a", [3, 1], [0.0, 3.5], version=2, shuffle=True), _group("b", [2, 2], [1.0, 0.5], version=3)]
    b = RolloutBatch.from_groups(groups, policy_version=3, quarantine=True)
    assert len(b) == 4 and b.n_groups == 2 and b.quarantine
    assert b.group.tolist() == [0, 0, 1, 1] and b.version.tolist() == [2, 2, 3, 3]
    assert b.stale.tolist() == [True, True, False, False]
    assert b.lengths.tolist() == [3, 1, 2, 2] and b.mask.shape == (4, 3)
    assert b.mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 0]]
    assert b.rewards.tolist() == [0.0, 3.5, 1.0, 0.5] and b.rewards.dtype == torch.float64  # grades by rollout id
    assert b.gt_pass.tolist() == [False, True, False, False]
    assert b.exploited[:, 0].tolist() == [False, False, True, False] and not b.exploited[:, 1:].any()
    torch.testing.assert_close(b.behaviour_logp[0], torch.tensor([-0.1, -0.1, -0.1]))
    torch.testing.assert_close(b.behaviour_logp[1], torch.tensor([-0.2, 0.0, 0.0]))
    assert b.prompt_ids == [[5, 6, 7], [5, 6, 7]] and b.token_ids[1] == [10]
    assert b.penalty is None and b.advantages is None and b.keep is None


def test_missing_behaviour_logprobs_are_zero_and_bad_groups_are_named():
    b = RolloutBatch.from_groups([_group("a", [2, 2], [0.0, 1.0], logprobs=False)], 0)
    assert torch.equal(b.behaviour_logp, torch.zeros(2, 2))
    bad = _group("broken", [2, 2], [0.0, 1.0])
    bad.grades.pop()
    with pytest.raises(BatchError, match="group 'broken': 1 grades for 2 completions"):
        RolloutBatch.from_groups([bad], 0)


@pytest.mark.parametrize("loss_type", ["dr_grpo", "grpo"])
def test_vectorised_advantages_equal_the_per_group_loop_bit_for_bit(loss_type):
    gen = torch.Generator().manual_seed(0)
    groups = [_group(f"g{p}", [2] * 8, (torch.randint(0, 8, (8,), generator=gen) * 0.5).tolist()) for p in range(6)]
    groups.append(_group("flat", [2] * 8, [3.5] * 8))
    b = RolloutBatch.from_groups(groups, 0)
    b.compute_advantages(loss_type, 1e-4)
    want, keep = reference_advantages(groups, loss_type, 1e-4)
    assert torch.equal(b.advantages, want)
    assert b.keep.tolist() == keep and keep[-1] is False
    assert b.kept_rows().tolist() == [i for i in range(len(b)) if keep[i // 8]]


def test_ragged_groups_and_rebound_penalty_per_chunk():
    groups = [_group("a", [1, 1, 1], [0.0, 1.0, 3.5]), _group("b", [1, 1], [0.5, 0.5]), _group("c", [1, 1, 1], [1, 1, 0])]
    b = RolloutBatch.from_groups(groups, 0)
    pen = torch.tensor([0.1, 0.2, 0.3, 0.0, 0.25, 0.0, 0.0, 0.0], dtype=torch.float32)
    for rows in (torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5, 6, 7])):  # two micro-batches, whole groups
        b.apply_penalty(rows, pen[rows])
        b.compute_advantages("dr_grpo", 1e-4, groups=torch.unique(b.group[rows]))
    want, keep = reference_advantages(groups, "dr_grpo", 1e-4, penalty=pen.tolist())
    assert torch.equal(b.advantages, want) and b.keep.tolist() == keep == [True, True, True]
    torch.testing.assert_close(b.shaped_rewards, b.rewards - pen.double())
    with pytest.raises(BatchError, match="different sizes"):
        b.group_rows(torch.tensor([0, 1]))


def test_chunks_sort_by_length_or_keep_groups_whole():
    groups = [_group("a", [5, 1, 3], [0, 1, 2]), _group("b", [2, 4], [0, 1]), _group("c", [1], [0])]
    b = RolloutBatch.from_groups(groups, 0)
    rows = torch.arange(len(b))
    assert [c.tolist() for c in b.chunks(rows, 2, group_aligned=False)] == [[1, 5], [3, 2], [4, 0]]
    assert [c.tolist() for c in b.chunks(rows, 4, group_aligned=True)] == [[0, 1, 2], [3, 4, 5]]
    mb = b.micro(torch.tensor([3, 4]))
    assert mb.width == 4 and mb.prompts == [[5, 6, 7]] * 2 and mb.completions == [[10, 11], [10, 11, 12, 13]]
    assert mb.mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
