"""Test-wide setup: 8 fake CPU devices for mesh tests, quiet logs, full-precision float32 matmuls.

XLA_FLAGS must be set before jax is first imported, so it is set here for the whole session.
"""

import os
import shutil
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
# The suite compiles the same small programs again and again (tiny train steps in many tests, and
# in `encdec-adapt` child processes): this process, the xdist workers and their children share one
# JAX compilation cache for the run (a sixth of the trainer tests' time; a third of a tiny train
# run in a child). It starts empty and is removed at the end, so every run compiles afresh.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ  # else a user's, or the xdist parent's
_CHILD_CACHE = {
    "JAX_COMPILATION_CACHE_DIR": os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
    or tempfile.mkdtemp(prefix="encdec_adapt_test_jax_cache_"),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
}
for _name in _CHILD_CACHE:
    os.environ.pop(_name, None)

import jax  # noqa: E402 (after the environment above)
import pytest  # noqa: E402

os.environ.update(_CHILD_CACHE)
jax.config.update("jax_compilation_cache_dir", _CHILD_CACHE["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

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
    "test_data_shards.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable within a file


def pytest_unconfigure(config):
    # The process that made the cache directory removes it (xdist workers inherit its name).
    if _OWN_CACHE and not hasattr(config, "workerinput"):
        shutil.rmtree(_CHILD_CACHE["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
