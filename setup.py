"""gorilla-jax: Gorilla (LLM connected with massive APIs) in JAX/Flax for Cloud TPU."""
from setuptools import find_packages, setup

CORE = [
    "jax[cpu]==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "tensorflow-cpu==2.21.0",
    "tensorflow-datasets==4.9.10",
    "sentencepiece==0.2.3",
    "bm25s==0.3.16",
    "tokenizers==0.23.3",
    "safetensors==0.8.0",
    "pyyaml>=6.0",
    "importlib-resources>=6.0",  # tensorflow-datasets imports it without declaring it
    "tqdm>=4.66",
    "matplotlib>=3.8",
    "tensorboard==2.21.0",
]

# torch is pinned exactly: any other version pulls multi-GB CUDA builds on CPU machines.
TORCH = ["torch==2.13.0", "transformers==5.23.0"]

TEST = TORCH + [
    "pytest>=8",
    "hypothesis>=6.100",
    # Real artifacts used by the tests: a LLaMA-family sentencepiece model and GGUF support.
    "mistral-common==1.13.1",
    "gguf==0.19.0",
    "accelerate==1.15.0",
    # Ahead-of-time compilation for TPU topologies on a CPU machine (the fit check's tests);
    # the version jax[tpu]==0.10.2 pins.
    "libtpu==0.0.42.1",
]

setup(
    name="gorilla-jax",
    version="0.1.0",
    description="Gorilla (LLM connected with massive APIs) reimplemented in JAX/Flax for Cloud TPU",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["gorilla_jax*", "data_pipeline*", "eval*"]),
    package_data={"data_pipeline": ["sample/*", "sample/**/*"],
                  # compiled on first use (gorilla_jax/cpu_kernels)
                  "gorilla_jax": ["cpu_kernels/*.cc", "cpu_kernels/*.h"]},
    include_package_data=True,
    install_requires=CORE,
    extras_require={
        "torch": TORCH,
        "bench": TORCH,
        "test": TEST,
        # On Cloud TPU VMs: `pip install -e .[tpu]` (jax with the matching libtpu).
        "tpu": ["jax[tpu]==0.10.2"],
    },
    entry_points={"console_scripts": ["gorilla-jax=gorilla_jax.cli:main"]},
)
