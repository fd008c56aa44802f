"""Image quality against a reference folder's images, and CLIP score against the prompts."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ovsd3.errors import OvsdError, reason_of
from ovsd3.metrics import psnr, ssim


def read_rgb(path: str | Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float64)  # float before any difference is taken


def image_agreement(reference_paths: list, test_paths: list) -> dict:
    """PSNR (dB) and SSIM of each image against the reference image drawn from the same prompt and seed."""
    pairs = [(read_rgb(a), read_rgb(b)) for a, b in zip(reference_paths, test_paths)]
    return {"psnr_db": [psnr(a, b, data_range=255.0) for a, b in pairs],
            "ssim": [ssim(a, b, data_range=255.0) for a, b in pairs]}


class ClipScorer:
    """CLIP score as torchmetrics defines it: 100 x max(cosine(image embedding, text embedding), 0).

    ``model`` is a hub id or a local folder holding a CLIPModel with its processor (tokenizer and image
    processor). Needs PyTorch and transformers (the convert extras).
    """

    def __init__(self, model: str):
        try:
            from transformers import CLIPModel, CLIPProcessor
        except ImportError as error:
            raise OvsdError(f"--clip needs the convert extras ({error.name} is missing): "
                            f"pip install 'ovsd3[convert]'") from None
        try:
            self.model = CLIPModel.from_pretrained(model).eval()
            self.processor = CLIPProcessor.from_pretrained(model)
        except Exception as error:  # hub errors, missing files, wrong model type
            reason = reason_of(error)
            raise OvsdError(f"cannot load CLIP model {model!r}: {reason}") from None
        self.name = model

    def scores(self, image_paths: list, prompts: list[str]) -> list[float]:
        import torch
        from PIL import Image

        images = [Image.open(path).convert("RGB") for path in image_paths]
        inputs = self.processor(text=prompts, images=images, return_tensors="pt", padding="max_length",
                                truncation=True, max_length=self.model.config.text_config.max_position_embeddings)
        with torch.inference_mode():
            image_embeds = self.model.get_image_features(pixel_values=inputs["pixel_values"])
            text_embeds = self.model.get_text_features(input_ids=inputs["input_ids"],
                                                       attention_mask=inputs.get("attention_mask"))
        image_embeds = getattr(image_embeds, "pooler_output", image_embeds)
        text_embeds = getattr(text_embeds, "pooler_output", text_embeds)
        cosine = torch.nn.functional.cosine_similarity(image_embeds.float(), text_embeds.float(), dim=-1)
        return [float(100.0 * max(value, 0.0)) for value in cosine.tolist()]
