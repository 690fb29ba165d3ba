"""ResNet18 and MobileNetV3-small, written from their published
architectures (He et al. 2015; Howard et al. 2019, torchvision's layer
configuration): torchvision is not used because no wheel matching torch
2.13.0+cpu imports here.  Weights are random (seeded) with BatchNorm
statistics set to non-trivial values; the compile's checks are relative to
the fp32 model, so trained weights are not needed.  torch is imported inside
the builders."""

from __future__ import annotations

import io


def _init(model, seed: int):
    import torch

    from fixtures.real_models import randomize_batchnorm

    torch.manual_seed(seed)
    return randomize_batchnorm(model, mean=(-0.2, 0.2))


def resnet18(num_classes: int = 1000):
    import torch
    from torch import nn

    class Basic(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.down = None
            if stride != 1 or cin != cout:
                self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return torch.relu(y + (x if self.down is None else self.down(x)))

    class ResNet18(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                      nn.MaxPool2d(3, 2, 1))
            layers, cin = [], 64
            for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
                layers += [Basic(cin, cout, stride), Basic(cout, cout, 1)]
                cin = cout
            self.layers = nn.Sequential(*layers)
            self.fc = nn.Linear(512, num_classes)

        def forward(self, x):
            x = self.layers(self.stem(x))
            x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
            return self.fc(x)

    return _init(ResNet18(), 0)


def mobilenet_v3_small(num_classes: int = 1000):
    from torch import nn

    def div8(v):
        new = max(8, int(v + 4) // 8 * 8)
        return new + 8 if new < 0.9 * v else new

    class SE(nn.Module):
        def __init__(self, c):
            super().__init__()
            sq = div8(c // 4)
            self.fc1 = nn.Conv2d(c, sq, 1)
            self.fc2 = nn.Conv2d(sq, c, 1)

        def forward(self, x):
            s = nn.functional.adaptive_avg_pool2d(x, 1)
            s = nn.functional.hardsigmoid(self.fc2(nn.functional.relu(self.fc1(s))))
            return x * s

    class Block(nn.Module):
        def __init__(self, cin, k, exp, cout, se, act, stride):
            super().__init__()
            Act = nn.Hardswish if act == "HS" else nn.ReLU
            layers = []
            if exp != cin:
                layers += [nn.Conv2d(cin, exp, 1, bias=False), nn.BatchNorm2d(exp), Act()]
            layers += [nn.Conv2d(exp, exp, k, stride, (k - 1) // 2, groups=exp, bias=False), nn.BatchNorm2d(exp), Act()]
            if se:
                layers.append(SE(exp))
            layers += [nn.Conv2d(exp, cout, 1, bias=False), nn.BatchNorm2d(cout)]
            self.body = nn.Sequential(*layers)
            self.res = stride == 1 and cin == cout

        def forward(self, x):
            y = self.body(x)
            return x + y if self.res else y

    # (in, kernel, expanded, out, SE, activation, stride): torchvision's mobilenet_v3_small
    cfg = [(16, 3, 16, 16, True, "RE", 2), (16, 3, 72, 24, False, "RE", 2), (24, 3, 88, 24, False, "RE", 1),
           (24, 5, 96, 40, True, "HS", 2), (40, 5, 240, 40, True, "HS", 1), (40, 5, 240, 40, True, "HS", 1),
           (40, 5, 120, 48, True, "HS", 1), (48, 5, 144, 48, True, "HS", 1), (48, 5, 288, 96, True, "HS", 2),
           (96, 5, 576, 96, True, "HS", 1), (96, 5, 576, 96, True, "HS", 1)]

    class MobileNetV3Small(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish())
            self.blocks = nn.Sequential(*[Block(*c) for c in cfg])
            self.last = nn.Sequential(nn.Conv2d(96, 576, 1, bias=False), nn.BatchNorm2d(576), nn.Hardswish())
            self.head = nn.Sequential(nn.Linear(576, 1024), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(1024, num_classes))

        def forward(self, x):
            x = self.last(self.blocks(self.stem(x)))
            x = nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)
            return self.head(x)

    return _init(MobileNetV3Small(), 1)


def export(model, size: int = 224):
    """TorchScript export, opset 17, batch axis dynamic (the npu target fixes it)."""
    import onnx
    import torch

    from fixtures.exporters import torchscript_export

    buf = io.BytesIO()
    torchscript_export(model, (torch.zeros(1, 3, size, size),), buf, ["image"], ["logits"],
                       {"image": {0: "batch"}, "logits": {0: "batch"}})
    return onnx.load_from_string(buf.getvalue())
