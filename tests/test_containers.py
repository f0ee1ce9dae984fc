"""The images' versions are written once (containers/versions.env) and must
fit the ranges pyproject.toml promises."""

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def read_versions() -> dict[str, str]:
    versions = {}
    for line in (ROOT / "containers" / "versions.env").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, value = line.split("=", 1)
            versions[key] = value
    return versions


def requirement(name: str, extra: str | None = None) -> Requirement:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["optional-dependencies"][extra] if extra else project["dependencies"]
    matches = [Requirement(r) for r in reqs if Requirement(r).name == name]
    assert matches, f"pyproject.toml lists no {name} requirement ({extra or 'core'})"
    return matches[0]


@pytest.mark.parametrize("key,package,extra", [
    ("TORCH_VERSION", "torch", None),
    ("TRANSFORMERS_VERSION", "transformers", None),
    ("VLLM_VERSION", "vllm", "vllm"),
    ("FLASH_ATTN_VERSION", "flash-attn", "flash"),
])
def test_pinned_version_fits_pyproject_range(key, package, extra):
    pinned = Version(read_versions()[key])
    assert requirement(package, extra).specifier.contains(pinned, prereleases=True), (
        f"containers/versions.env {key}={pinned} is outside pyproject's {requirement(package, extra)}")


def test_images_use_cuda_12_8_and_the_pinned_vllm_wheel():
    versions = read_versions()
    assert re.search(r"cuda:12\.8(\.\d+)?-", versions["CUDA_IMAGE"])
    assert versions["TORCH_INDEX"].endswith("/cu128")
    assert f"vllm-{versions['VLLM_VERSION']}+cu128" in versions["VLLM_WHEEL"]


@pytest.mark.parametrize("dockerfile", ["teacher.Dockerfile", "trainer.Dockerfile"])
def test_dockerfiles_take_every_version_from_build_args(dockerfile):
    text = (ROOT / "containers" / dockerfile).read_text()
    versions = read_versions()
    for key, value in versions.items():
        if f"${{{key}}}" in text or f"ARG {key}" in text:
            continue
        assert value not in text, f"{dockerfile} hard-codes {value}; use ARG {key}"
    # Every ARG a Dockerfile declares must be supplied by versions.env.
    for arg in re.findall(r"^ARG (\w+)", text, flags=re.M):
        assert arg in versions, f"{dockerfile} declares ARG {arg} that versions.env does not set"
    # No version-looking pin written inline after '=='.
    assert not re.search(r"==\d", text), f"{dockerfile} pins a version inline"
