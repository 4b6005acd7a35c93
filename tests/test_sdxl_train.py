"""SDXL fine-tuning: the training batch's conditioning (time ids from each image's size and crop, dropped
captions zeroed) against diffusers' own time-id assembly and the sampler's conditioning, and
configs/sdxl_finetune.py:tiny end to end (loss falls, both text encoders train, export loads in diffusers)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
torch = pytest.importorskip("torch", reason="the PyTorch reference is not installed (torch-free run)")

import sdjax
from cli_checks import train_tiny
from sdjax.conditioning import MicroConditioning, batch_conditioning, encode_text, time_ids

CAPTIONS = ["a red circle", "a blue square on green", "a small yellow star"]


def _batch(sd, dropped):
    return {**{k: jnp.asarray(v) for k, v in sd.tokenize(CAPTIONS).items()},
            "original_size": jnp.asarray([[40, 60], [1024, 768], [512, 512]], jnp.int32),
            "crop_top_left": jnp.asarray([[0, 4], [96, 0], [0, 0]], jnp.int32),
            "caption_dropped": jnp.asarray(dropped)}


def test_training_time_ids_are_diffusers_and_the_samplers(sdxl_checkpoints):
    """Per example: original size + crop corner + target size, in diffusers' order (its pipeline's
    _get_add_time_ids, which its SDXL training script mirrors) and equal to what the sampler builds from
    the same MicroConditioning; text embeddings untouched where the caption was kept."""
    import diffusers

    folder = sdxl_checkpoints["base"][0]
    sd = sdjax.load(folder)
    batch = _batch(sd, [False, False, False])
    cond = jax.jit(lambda p, b: batch_conditioning(sd.model, p, b, (32, 48)))(sd.params, batch)
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(folder)
    for row in range(len(CAPTIONS)):
        original = tuple(int(v) for v in batch["original_size"][row])
        crop = tuple(int(v) for v in batch["crop_top_left"][row])
        ref = pipe._get_add_time_ids(original, crop, (32, 48), dtype=torch.float32,
                                     text_encoder_projection_dim=24)
        np.testing.assert_array_equal(np.asarray(cond.time_ids[row]), ref[0].numpy())
        sampler = time_ids(sd.model, MicroConditioning(original, crop, (32, 48)), 32, 48)
        np.testing.assert_array_equal(np.asarray(cond.time_ids[row]), sampler)
    text = encode_text(sd.model, sd.params, batch)
    np.testing.assert_allclose(cond.context, text.context, rtol=1e-5, atol=1e-6)  # jitted vs not
    np.testing.assert_allclose(cond.pooled, text.pooled, rtol=1e-5, atol=1e-6)


def test_dropped_captions_are_zeroed_as_sdxl_trains_them(sdxl_checkpoints, checkpoints):
    """SDXL (force_zeros_for_empty_prompt): a dropped caption's context and pooled embedding are zeros
    (what its sampler gives for "no negative prompt"), the others untouched; SD 1.x encodes the empty
    caption as always and ignores the flag."""
    sd = sdjax.load(sdxl_checkpoints["base"][0])
    dropped = [False, True, False]
    cond = batch_conditioning(sd.model, sd.params, _batch(sd, dropped), (32, 32))
    kept = batch_conditioning(sd.model, sd.params, _batch(sd, [False] * 3), (32, 32))
    for field in ("context", "pooled"):
        ours, full = np.asarray(getattr(cond, field)), np.asarray(getattr(kept, field))
        assert np.all(ours[1] == 0) and np.abs(full[1]).max() > 0.1
        np.testing.assert_array_equal(ours[[0, 2]], full[[0, 2]])
    np.testing.assert_array_equal(cond.time_ids, kept.time_ids)  # the sizes are not dropped
    sd1 = sdjax.load(checkpoints["sd1"][0])
    batch = _batch(sd1, dropped)
    plain = batch_conditioning(sd1.model, sd1.params, batch, (32, 32))
    assert plain.pooled is None and plain.time_ids is None
    np.testing.assert_array_equal(plain.context, encode_text(sd1.model, sd1.params, batch).context)


def _train(workdir, folder, data_dir, *flags):
    return train_tiny("sdxl_finetune.py", workdir, folder, data_dir, *flags)


def test_sdxl_finetune_tiny_trains_and_exports_a_diffusers_sdxl_folder(sdxl_checkpoints, tmp_path):
    import diffusers

    folder = sdxl_checkpoints["base"][0]
    workdir = tmp_path / "run"
    result = _train(workdir, folder, str(tmp_path / "data"), "--config.total_steps=30",
                    "--config.optimizer.learning_rate=1e-3", "--config.log.every_steps=1",
                    "--config.checkpoint.every_steps=30", "--config.model.train_text_encoder=True")
    assert result.returncode == 0, result.stderr[-3000:]
    with open(workdir / "logs" / "metrics.jsonl") as f:
        losses = [json.loads(line)["loss"] for line in f if "loss" in json.loads(line)]
    assert len(losses) == 30 and np.mean(losses[-8:]) < 0.6 * np.mean(losses[:8]), losses
    exported = diffusers.StableDiffusionXLPipeline.from_pretrained(str(workdir / "export"))
    base = diffusers.StableDiffusionXLPipeline.from_pretrained(folder)
    for name in ("unet", "text_encoder", "text_encoder_2", "vae"):
        ours, theirs = getattr(exported, name).state_dict(), getattr(base, name).state_dict()
        assert ours.keys() == theirs.keys(), name
        moved = max(float((ours[k].float() - theirs[k].float()).abs().max()) for k in ours)
        assert (moved > 0) == (name != "vae"), (name, moved)  # every trained network moved, the VAE is frozen
    assert exported.config.force_zeros_for_empty_prompt  # still an SDXL base: samples as one


def test_refiner_fine_tuning_is_refused_in_one_line(sdxl_checkpoints, tmp_path):
    result = _train(tmp_path / "run", sdxl_checkpoints["refiner"][0], str(tmp_path / "data"))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "aesthetic score" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "run" / "checkpoints").exists()
