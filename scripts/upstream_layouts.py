"""Regenerate tests/upstream_layouts.json and check numerical equivalence with upstream code.

Usage (needs network access to PyPI only; nothing here is imported by the package):
    mkdir -p /tmp/upstream && cd /tmp/upstream
    pip download --no-deps timm torchvision==0.24.1 -d . && for f in *.whl; do unzip -qo $f -d src; done
    python /path/to/scripts/upstream_layouts.py

torchvision's compiled ops do not load beside the CPU torch used here and timm imports
torchvision, so the pure-Python model files are loaded with stub modules around them.
Prints max |ours - upstream| of the final backbone feature for OS 32/16/8.
"""
import importlib.util, json, sys, types
import torch
sys.path.insert(0, "src")
# Let `import torchvision` succeed without its compiled ops: load only pure-python modules.
tv = types.ModuleType("torchvision"); tv.__path__ = ["src/torchvision"]; sys.modules["torchvision"] = tv
tvm = types.ModuleType("torchvision.models"); tvm.__path__ = ["src/torchvision/models"]; sys.modules["torchvision.models"] = tvm
def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path); mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod; spec.loader.exec_module(mod); return mod
# stubs for the presets/transforms that the weight enums reference
tr = types.ModuleType("torchvision.transforms"); tr.__path__ = []; sys.modules["torchvision.transforms"] = tr
pre = types.ModuleType("torchvision.transforms._presets")
class _P:
    def __init__(self, *a, **k): pass
pre.ImageClassification = _P; pre.SemanticSegmentation = _P; pre.ObjectDetection = _P; pre.VideoClassification = _P; pre.OpticalFlow = _P
sys.modules["torchvision.transforms._presets"] = pre
tf = types.ModuleType("torchvision.transforms.functional"); tf.InterpolationMode = type("IM", (), {"BILINEAR": 2, "BICUBIC": 3, "NEAREST": 0})
sys.modules["torchvision.transforms.functional"] = tf; tr.functional = tf; tr.InterpolationMode = tf.InterpolationMode
utils = types.ModuleType("torchvision.utils"); utils._log_api_usage_once = lambda *a, **k: None
import collections.abc, itertools
def _make_ntuple(x, n):
    return tuple(x) if isinstance(x, collections.abc.Iterable) else tuple(itertools.repeat(x, n))
utils._make_ntuple = _make_ntuple; sys.modules["torchvision.utils"] = utils
ops = types.ModuleType("torchvision.ops"); ops.__path__ = []; sys.modules["torchvision.ops"] = ops
misc = load("torchvision.ops.misc", "src/torchvision/ops/misc.py")
load("torchvision.models._meta", "src/torchvision/models/_meta.py")
load("torchvision.models._api", "src/torchvision/models/_api.py")
load("torchvision.models._utils", "src/torchvision/models/_utils.py")
resnet = load("torchvision.models.resnet", "src/torchvision/models/resnet.py")
mnv2 = load("torchvision.models.mobilenetv2", "src/torchvision/models/mobilenetv2.py")
out = {}
def man(m): return {k: list(v.shape) for k, v in m.state_dict().items()}
out["resnet50"] = man(resnet.resnet50())
out["resnet101"] = man(resnet.resnet101())
out["mobilenet_v2"] = man(mnv2.mobilenet_v2())
print("torchvision ok")
json.dump(out, open("tv_manifest.json", "w"))  # merged into tests/upstream_layouts.json
# numerical equivalence with the upstream code, same weights
from deeplab.models.backbones import build_backbone
from deeplab.weights import load_backbone_weights
import tempfile, os
torch.manual_seed(0)
for name, ctor in [("resnet101", resnet.resnet101), ("mobilenet_v2", mnv2.mobilenet_v2)]:
    ref = ctor().eval()
    for m in ref.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1); m.running_var.uniform_(0.5, 1.5); m.weight.data.normal_(1, 0.1); m.bias.data.normal_(0, 0.1)
    f = tempfile.mktemp(suffix=".pth"); torch.save(ref.state_dict(), f)
    ours = build_backbone(name, output_stride=32).eval(); load_backbone_weights(ours, name, f)
    x = torch.randn(1, 3, 97, 129)
    with torch.no_grad():
        if name == "resnet101":
            r = ref.layer4(ref.layer3(ref.layer2(ref.layer1(ref.maxpool(ref.relu(ref.bn1(ref.conv1(x))))))))
        else:
            r = ref.features[:18](x)
        o = ours(x)["out"]
    print(name, tuple(o.shape), float((o - r).abs().max()))
    # OS 16 vs torchvision's replace_stride_with_dilation
    if name == "resnet101":
        ref16 = resnet.resnet101(replace_stride_with_dilation=[False, False, True]).eval(); ref16.load_state_dict(ref.state_dict())
        ours16 = build_backbone(name, output_stride=16).eval(); load_backbone_weights(ours16, name, f)
        ref8 = resnet.resnet101(replace_stride_with_dilation=[False, True, True]).eval(); ref8.load_state_dict(ref.state_dict())
        ours8 = build_backbone(name, output_stride=8).eval(); load_backbone_weights(ours8, name, f)
        with torch.no_grad():
            for rr, oo in ((ref16, ours16), (ref8, ours8)):
                r = rr.layer4(rr.layer3(rr.layer2(rr.layer1(rr.maxpool(rr.relu(rr.bn1(rr.conv1(x))))))))
                print(" dilated", tuple(r.shape), float((oo(x)["out"] - r).abs().max()))
