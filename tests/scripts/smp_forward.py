"""Load liverseg's weights into segmentation_models_pytorch's DeepLabV3+
(strict) and write its eval-mode logits for a given input batch.

    smp_forward.py WEIGHTS.safetensors INPUT.safetensors OUT.safetensors
"""
import sys
import torch
import segmentation_models_pytorch as smp
from safetensors.torch import load_file, save_file

weights, inputs, out = sys.argv[1:4]
model = smp.DeepLabV3Plus("resnet34", encoder_weights=None, in_channels=1, classes=2)
model.load_state_dict(load_file(weights), strict=True)
model.eval()
with torch.no_grad():
    logits = model(load_file(inputs)["x"])
save_file({"logits": logits.contiguous()}, out)
