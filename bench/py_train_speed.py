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
phases = [0.0, 0.0, 0.0]  # zero_grad (set to None) + forward + loss, backward, optimizer
for i in range(steps + 1):
    if i == 1:  # the first step warms up allocators and kernels
        t0, phases = time.perf_counter(), [0.0, 0.0, 0.0]
    t = time.perf_counter()
    opt.zero_grad()
    loss = loss_fn(model(x), y)
    loss.item()
    t_forward = time.perf_counter() - t
    loss.backward()
    t_backward = time.perf_counter() - t
    opt.step()
    phases[0] += t_forward
    phases[1] += t_backward - t_forward
    phases[2] += time.perf_counter() - t - t_backward
train = batch * steps / (time.perf_counter() - t0)
print("seconds per step: forward %.3f, backward %.3f, optimizer %.3f" % tuple(p / steps for p in phases), file=sys.stderr)
model.eval()
with torch.no_grad():
    model(x)
    t0 = time.perf_counter()
    for _ in range(steps):
        model(x)
infer = batch * steps / (time.perf_counter() - t0)
print(f"{train:.2f} {infer:.2f}")
