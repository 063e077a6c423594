"""Write the per-tensor statistics of segmentation_models_pytorch's
initialisation (mean, std and excess kurtosis of every state_dict tensor),
the fixture tests/fixtures/smp_init_deeplabv3plus_resnet34.tsv that
liverseg's initialisation is checked against (crates/model/tests/model.rs).

    .venv/bin/pip install segmentation-models-pytorch torch==2.13.0
    .venv/bin/python bench/smp_init_stats.py tests/fixtures

Kurtosis tells Kaiming-normal (0) from Kaiming-uniform (-1.2) where fan-in
equals fan-out and the std alone cannot.
"""
import sys
import torch
import segmentation_models_pytorch as smp

out = sys.argv[1] if len(sys.argv) > 1 else "."
torch.manual_seed(0)
model = smp.DeepLabV3Plus("resnet34", encoder_weights=None, in_channels=1, classes=2)
path = f"{out}/smp_init_deeplabv3plus_resnet34.tsv"
with open(path, "w") as f:
    f.write("# name\tnumel\tmean\tstd\texcess_kurtosis  (smp %s, torch %s, seed 0)\n" % (smp.__version__, torch.__version__))
    for name, t in model.state_dict().items():
        if not t.is_floating_point():
            continue
        x = t.detach().double().flatten()
        mean = x.mean().item()
        std = x.std(unbiased=False).item()
        kurt = (((x - mean) ** 4).mean() / std**4 - 3).item() if std > 0 else 0.0
        f.write(f"{name}\t{x.numel()}\t{mean:.9g}\t{std:.9g}\t{kurt:.6g}\n")
print(path)
