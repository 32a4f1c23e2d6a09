"""Companion of upstream_layouts.py for timm's aligned Xception (run it the same way)."""
import sys, json, types, importlib.abc, importlib.machinery
from unittest import mock
sys.path.insert(0, "src")
class Stub(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
    def create_module(self, spec):
        m = mock.MagicMock(); m.__path__ = []; m.__name__ = spec.name; m.__spec__ = spec
        m.__version__ = "0.24.1"
        return m
    def exec_module(self, module): pass
sys.meta_path.insert(0, Stub())
import timm
from timm.models import xception_aligned as xa
out = {}
for n in ["xception41", "xception65", "xception71"]:
    m = getattr(xa, n)()
    out[n] = {k: list(v.shape) for k, v in m.state_dict().items()}
    print(n, sum(p.numel() for p in m.parameters()))
json.dump(out, open("timm_manifest.json", "w"))
import torch, tempfile
from deeplab.models.backbones import build_backbone
from deeplab.weights import load_backbone_weights
torch.manual_seed(0)
for n in ["xception41", "xception65", "xception71"]:
    for os_ in (32, 16, 8):
        ref = getattr(xa, n)(output_stride=os_).eval()
        if os_ == 32:
            for m in ref.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.normal_(0, 0.1); m.running_var.uniform_(0.5, 1.5); m.weight.data.normal_(1, 0.1); m.bias.data.normal_(0, 0.1)
            sd = ref.state_dict(); f = tempfile.mktemp(suffix=".pth"); torch.save(sd, f)
        else:
            missing = ref.load_state_dict(sd, strict=False)
            if missing.missing_keys or missing.unexpected_keys: print("  timm itself cannot load its file at OS", os_, missing)
        ours = build_backbone(n, output_stride=os_).eval(); load_backbone_weights(ours, n, f)
        x = torch.randn(1, 3, 96, 128)
        with torch.no_grad():
            r = ref.forward_features(x); o = ours(x)["out"]
        print(n, os_, tuple(o.shape), float((o - r).abs().max()), float(r.abs().max()))
