import msgpack
import numpy as np
import pytest

from shared.schemas import (Completion, DeltaSUpdate, Grade, GradedGroup, PromptJob, RolloutGroup,
                            SamplingParams, SchemaError)


def _group():
    comp = Completion(rollout_id="j1:0", text="```python\nx=1\n```", token_ids=[1, 2, 3], logprobs=[-0.1, -0.2, -0.3])
    return RolloutGroup(job_id="j1", step=3, problem_id="7", policy_version=3, prompt_ids=[5, 6], completions=[comp])


def test_round_trips():
    job = PromptJob(job_id="j1", step=3, problem_id="7", prompt_text="p", prompt_ids=[1], sampling=SamplingParams(n=4))
    assert PromptJob.unpack(job.pack()) == job
    grade = Grade(formatted=True, can_compile=True, gt_pass=False, pass_frac=0.5,
                  exploited={"A": True, "B": False, "C": False, "D": False},
                  attempted={"A": True, "B": False, "C": False, "D": False}, reward=3.5)
    gg = GradedGroup(group=_group(), grades=[grade])
    assert GradedGroup.unpack(gg.pack()) == gg


def test_delta_update_carries_fp32_bytes():
    flat = np.arange(10, dtype="<f4")
    upd = DeltaSUpdate(version=2, names=["a", "b"], sizes=[4, 6], data=flat.tobytes())
    back = DeltaSUpdate.unpack(upd.pack())
    assert np.array_equal(np.frombuffer(back.data, dtype="<f4"), flat)
    assert len(upd.pack()) < flat.nbytes + 100


def test_float_codec_round_trips_through_the_wire():
    """shared.codec: what the learner encodes is what every engine decodes, bit for bit, as fp32."""
    import torch

    from shared.codec import decode_floats, encode_floats

    flat = torch.tensor([0.0, -1.5, 1e-8, 3.4e38, float("inf")], dtype=torch.float32)
    data = encode_floats(flat)
    assert data == flat.numpy().astype("<f4").tobytes() and len(data) == 4 * 5
    upd = DeltaSUpdate.unpack(DeltaSUpdate(version=1, names=["a"], sizes=[5], data=data).pack())
    back = decode_floats(upd.data)
    assert back.dtype == torch.float32 and torch.equal(back, flat)
    back += 1  # a writable copy, not a view of the (read-only) bytes
    half = torch.tensor([0.1, 0.2], dtype=torch.bfloat16)  # other dtypes go out as their fp32 value
    assert torch.equal(decode_floats(encode_floats(half)), half.float())


@pytest.mark.parametrize(
    "payload,needle",
    [
        (b"\xc1", "not msgpack"),
        (msgpack.packb([1, 2]), "expected a map"),
        (msgpack.packb({"schema_version": 99}), "schema_version 99"),
        (msgpack.packb({"schema_version": 1, "job_id": "x"}), "field "),
    ],
)
def test_malformed_messages_explain(payload, needle):
    with pytest.raises(SchemaError) as e:
        RolloutGroup.unpack(payload)
    assert needle in str(e.value)
