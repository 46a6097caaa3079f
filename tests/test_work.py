"""The board's work axis (issue 35): encoder-equivalent passes from counted FLOPs, reproducible."""
import pytest

from spdbench.scoring.work import encoder_equivalents, known_weights, pass_flops, pass_weights, _table
from spdbench.targets import load_target


@pytest.mark.parametrize("name", ["tiny", "tiny-inpaint", pytest.param("tiny-b", marks=pytest.mark.slow),
                                  pytest.param("tiny-ip2p", marks=pytest.mark.slow)])
def test_the_committed_flop_table_is_what_torch_counts_now(name):
    """The table the board reads is recounted from the models: a retrained or changed model whose
    table entry was not rewritten fails here instead of silently weighting work with old costs."""
    target = load_target(name)
    entry = _table()[f"{target.fingerprint}@128"]
    assert entry["flops"] == pass_flops(target, 128)


def test_weights_are_encoder_equivalents_and_scale_with_the_calls():
    w = known_weights(load_target("tiny").fingerprint, 128)
    assert w["vae_encoder_fwd"] + w["vae_encoder_bwd"] == pytest.approx(1.0)
    one_step = {"vae_encoder_fwd": 1, "vae_encoder_bwd": 1}
    assert encoder_equivalents(one_step, w) == pytest.approx(1.0)
    advdm_step = {"vae_encoder_fwd": 1, "vae_encoder_bwd": 1, "unet_fwd": 1, "unet_bwd": 1}
    assert encoder_equivalents({k: 40 * v for k, v in advdm_step.items()}, w) == pytest.approx(
        40 * encoder_equivalents(advdm_step, w))
    assert encoder_equivalents(advdm_step, w) > 1.0  # a UNet pass is work, whatever the model
    assert encoder_equivalents({}, w) is None and known_weights("0" * 16, 128) is None
    with pytest.raises(ValueError, match="unit of work"):
        pass_weights({"vae_encoder_fwd": 0.0, "vae_encoder_bwd": 0.0})
