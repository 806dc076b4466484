from setuptools import find_packages, setup

setup(
    name="sinklora",
    version="0.1.0",
    description="Triton kernels for SinkLoRA: SF-Attn for long-context LoRA training, "
    "H2O KV-cache eviction for decoding",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    license_files=["LICENSE"],
    python_requires=">=3.10",
    packages=find_packages(include=["sinklora", "sinklora.*"]),
    install_requires=[
        "torch>=2.11",
        "triton>=3.6",
        "transformers>=5.17,<6",
        "peft>=0.17",
        "numpy",
        "tqdm",
    ],
    extras_require={"test": ["pytest>=8", "matplotlib"]},
)
