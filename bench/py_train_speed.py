"""Training and inference images/s of segmentation_models_pytorch's
DeepLabV3Plus("resnet34", in_channels=1, classes=2) with Adam on random data,
the reference liverseg's `liverseg-torch bench-train` is compared with.

    .venv/bin/python bench/py_train_speed.py SIZE BATCH STEPS
Prints: train images/s, inference images/s.
"""
import sys, time
import torch
import segmentation_models_pytorch as smp

size, batch, steps = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
model = smp.DeepLabV3Plus("resnet34", encoder_weights=None, in_channels=1, classes=2)
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
loss_fn = torch.nn.CrossEntropyLoss()
x = torch.rand(batch, 1, size, size)
y = torch.randint(0, 2, (batch, size, size))
model.train()
for i in range(steps + 1):
    if i == 1:  # the first step warms up allocators and kernels
        t0 = time.perf_counter()
    opt.zero_grad()
    loss = loss_fn(model(x), y)
    loss.backward()
    opt.step()
train = batch * steps / (time.perf_counter() - t0)
model.eval()
with torch.no_grad():
    model(x)
    t0 = time.perf_counter()
    for _ in range(steps):
        model(x)
infer = batch * steps / (time.perf_counter() - t0)
print(f"{train:.2f} {infer:.2f}")
