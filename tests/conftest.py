"""Shared fixtures and helpers: tiny random U-Nets built and saved by the tests themselves (CPU,
seconds), the overrides every stage test starts from, a run taken through generate, annotate and
select, `hspace` run as a subprocess, one thread for modules of small tensors, and the references
the maths is checked against (exact PCA by SVD, principal angles).

Tests marked ``slow`` are left out by ``make test-fast``; ``make test`` runs everything. A test is
slow when it starts a subprocess, trains a model or runs a stage end to end (itself or through a
fixture); besides those, only tests of real-size networks (CLIP, MTCNN, the face embedder) and tests
that sample the shipped model over many seeds (its statistics, the PCA contract on real h). Nothing
else: maths on small arrays and tiny models stays in the fast suite.
"""
from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub is imported: it reads this once
# the CLIP text-embedding cache of the tests (and their subprocesses) in a folder of their own, not ~/.cache
if "HSPACE_CACHE" not in os.environ:
    os.environ["HSPACE_CACHE"] = tempfile.mkdtemp(prefix="hspace-test-cache-")
    atexit.register(shutil.rmtree, os.environ["HSPACE_CACHE"], True)

import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel  # noqa: E402

warnings.filterwarnings("ignore", message=".*should be kept in float32.*")
# one thread per pytest-xdist worker (two workers share the two cores), two otherwise
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)

HSPACE = str(Path(sys.executable).parent / "hspace")
TESTS = Path(__file__).resolve().parent


def tiny_overrides(run_dir, model_dir, steps: int = 3) -> list[str]:
    """The overrides every stage test starts from: its run directory, the tiny model, the CPU."""
    return [f"run_dir={run_dir}", f"model.name_or_path={model_dir}", f"model.num_inference_steps={steps}",
            "trainer.accelerator=cpu"]


def hspace(*args, cwd, check: bool = True, log: Path | None = None, launcher=(), timeout: int = 900):
    """``hspace <args>`` in a subprocess -> CompletedProcess (``check``: exit status 0 asserted); with
    ``log``, started with its output going there and returned without waiting (a Popen). One thread
    per process (CPU kernels round differently with other thread counts); tests/ is on the path
    (fake_annotators)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [*launcher, HSPACE, *map(str, args)]
    if log is not None:
        f = open(log, "w")
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=f, stderr=f, text=True)
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out


def make_tiny_unet(seed: int = 0, size: int = 16) -> UNet2DModel:
    """A 2-level UNet2DModel (h: 16 x size/2 x size/2) with random weights, scaled down so
    that samples do not saturate."""
    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=size,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        attention_head_dim=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    with torch.no_grad():
        unet.conv_out.weight.mul_(0.3)
    return unet.eval()


@pytest.fixture
def tiny_unet():
    return make_tiny_unet()


@pytest.fixture
def tiny_model(tiny_unet):
    from pipeline import HSpaceModel

    def build(eta=0.0, steps=5, hook="after"):
        return HSpaceModel(tiny_unet, DDIMScheduler(), num_inference_steps=steps, eta=eta, hook=hook, device="cpu")

    return build


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread and one BLAS thread (numpy, scikit-learn) for a module of tiny models or small
    tensors (``pytestmark = pytest.mark.usefixtures("one_thread")``): a second thread's hand-offs cost
    more than they save, and the CPUs are shared."""
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(before)


def load_bench(name: str):
    """The script bench/<name>.py as a module (bench/ is no package), for the tests of its core."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def exact_pca(X: torch.Tensor):
    """The reference PCA of every step by a full SVD: X (N, T, D) -> mean (T, D), components (T, D', D),
    explained variance (T, D') (ddof=1), total variance (T,)."""
    Xc = (X - X.mean(0)).transpose(0, 1)
    _, S, Vh = torch.linalg.svd(Xc, full_matrices=False)
    return X.mean(0), Vh, S ** 2 / (X.shape[0] - 1), Xc.pow(2).sum((1, 2)) / (X.shape[0] - 1)


def principal_angles(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Principal angles (rad, ascending) between the row spaces of a and b: (..., k, d) each, any
    independent rows (orthonormalised here) -> (..., k)."""
    qa, qb = torch.linalg.qr(a.double().mT)[0], torch.linalg.qr(b.double().mT)[0]
    return torch.arccos(torch.linalg.svdvals(qa.mT @ qb).clamp(max=1.0))


def selected_run(run_dir, model_dir, *overrides: str):
    """A tiny run taken through generate, annotate (the known responses of fake_annotators.brightness:
    bright, red) and select, in this process -> its configuration; ``overrides`` after the common ones."""
    from pipeline.config import load_config
    from pipeline.stages.annotate import run_annotate
    from pipeline.stages.generate import run_generate
    from pipeline.stages.select import run_select

    cfg = load_config(None, [*tiny_overrides(run_dir, model_dir), "annotate.annotators=[fake_annotators:brightness]",
                             "select.attributes=[bright,red]", "evaluate.scorer=fake_annotators:brightness", *overrides])
    run_generate(cfg)
    run_annotate(cfg)
    run_select(cfg)
    return cfg


@pytest.fixture(scope="session")
def tiny_family_folders(tmp_path_factory):
    """family -> its tiny random-weight pipeline saved in the hub layout (pipeline.testing.tiny_families),
    each built the first time a test asks for it."""
    from pipeline.testing import tiny_families

    root = tmp_path_factory.mktemp("tiny-families")

    class Folders(dict):
        def __missing__(self, family):
            self[family] = tiny_families.save(family, root / family)
            return self[family]

    return Folders()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny model saved in the flat hub-DDPM layout (config.json + scheduler_config.json)."""
    path = tmp_path_factory.mktemp("tiny-ddpm")
    make_tiny_unet().save_pretrained(path)
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(path)
    return path


def _has_playwright() -> bool:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="session")
def browser():
    """Headless Debian chromium driven by Playwright (no downloaded browser); skipped without them, a
    failure under CI=true."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None or not _has_playwright():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI must run the browser tests: install Debian's chromium and the test extra (playwright)")
        pytest.skip("needs Debian's chromium (apt-get install chromium) and playwright (pip install -e '.[test]')")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        yield b
        b.close()

