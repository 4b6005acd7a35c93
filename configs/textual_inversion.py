"""Textual inversion: teach a checkpoint a new word from a few images of one concept. Every network stays
frozen; only the new word's embedding rows train. The export is diffusers' learned_embeds.safetensors
(SDXL: also learned_embeds_2.safetensors) and an A1111 embedding (<token>.safetensors), which sample.py
--embedding, diffusers' load_textual_inversion and A1111 read.

    python train.py --config configs/textual_inversion.py --workdir runs/ti \\
        --config.model.pretrained=/path/to/stable-diffusion-v1-5 --config.data.folder.src=/path/to/images \\
        --config.textual_inversion.token="<my-cat>" --config.textual_inversion.initializer=cat

Captions become textual_inversion.template ("a photo of {}"); with template "" the folder's own captions are
used, with textual_inversion.replace naming a word in them to become the token. `:tiny`: the shipped shapes
model learns "<tri>" for triangles on CPU in a few minutes.
"""

from sdjax.train.recipes import textual_inversion_config


def get_config(arg: str | None = None):
    return textual_inversion_config(tiny=arg == "tiny")
