"""Test-wide setup: 8 fake CPU devices for mesh tests, quiet logs, full-precision float32 matmuls.

XLA_FLAGS must be set before jax is first imported, so it is set here for the whole session.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def embedded_corpus(tmp_path_factory):
    """Builds the embedded stdlib corpus once per session into a fresh directory (about ten
    seconds) and registers the default tasks; the user's cache is never touched."""
    from encdec_adapt.data import corpus

    old = os.environ.get(corpus.DATA_DIR_ENV)
    os.environ[corpus.DATA_DIR_ENV] = str(tmp_path_factory.mktemp("tfds"))
    import encdec_adapt.tasks  # noqa: F401  (registers the default tasks)

    yield os.environ[corpus.DATA_DIR_ENV]
    if old is None:
        os.environ.pop(corpus.DATA_DIR_ENV)
    else:
        os.environ[corpus.DATA_DIR_ENV] = old


# The files that take longest (about a minute or more each on a 2-core runner), heaviest first.
# scripts/test.sh hands whole files to two workers in collection order; starting with these keeps
# the run from ending with one worker alone on a long file.
HEAVY_FIRST = (
    "test_trainer.py",
    "test_sharding.py",
    "test_embedding_models.py",
    "test_train_resume.py",
    "test_encdec.py",
    "test_blockwise.py",
    "test_install.py",
    "test_infer.py",
    "test_eval_metrics.py",
    "test_retrieval_eval.py",
    "test_scan_layers.py",
    "test_dual_encoder.py",
    "test_multiprocess.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable within a file
