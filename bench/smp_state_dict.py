"""Write segmentation_models_pytorch's state_dict names and shapes, the list
tests/fixtures/smp_*.tsv that liverseg's weight names are checked against.

    .venv/bin/pip install segmentation-models-pytorch torch==2.13.0
    .venv/bin/python bench/smp_state_dict.py tests/fixtures
"""
import sys
import segmentation_models_pytorch as smp

out = sys.argv[1] if len(sys.argv) > 1 else "."
models = {
    "smp_deeplabv3plus_resnet34.tsv": smp.DeepLabV3Plus("resnet34", encoder_weights=None, in_channels=1, classes=2),
}
for name, model in models.items():
    with open(f"{out}/{name}", "w") as f:
        for k, v in model.state_dict().items():
            f.write(f"{k}\t{list(v.shape)}\n")
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(name, n)
