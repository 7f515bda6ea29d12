"""Shared fixtures and helpers: tiny random U-Nets built and saved by the tests themselves (CPU,
seconds), the overrides every stage test starts from, and `hspace` run as a subprocess.

Tests marked ``slow`` (subprocesses, end-to-end stages, model training, the shipped model) are
left out by ``make test-fast``; ``make test`` runs everything.
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
torch.set_num_threads(2)

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


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny models (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    a second thread's hand-offs cost more than they save, and the CPUs are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_unet():
    return make_tiny_unet()


@pytest.fixture
def tiny_model(tiny_unet):
    from pipeline import HSpaceModel

    def build(eta=0.0, steps=5, hook="after"):
        return HSpaceModel(tiny_unet, DDIMScheduler(), num_inference_steps=steps, eta=eta, hook=hook, device="cpu")

    return build


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
