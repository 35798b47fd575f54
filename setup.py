from setuptools import Extension, find_packages, setup

setup(
    name="albef_ds",
    version="0.1.0",
    description="ALBEF vision-language pretraining at cluster scale with DeepSpeed ZeRO",
    packages=find_packages(include=["albef_ds", "albef_ds.*"]),
    package_data={"albef_ds": ["configs/*.yaml", "configs/*.txt", "search/*.html"]},
    # decodes a training crop's region of a JPEG, not the whole image (libjpeg-turbo's headers:
    # Debian's libjpeg62-turbo-dev); optional: without it the data path decodes with Pillow, slower
    ext_modules=[Extension("albef_ds.data._jpeg", ["albef_ds/data/_jpeg.c"], libraries=["jpeg"], optional=True)],
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "deepspeed>=0.16",
        "timm>=1.0",
        "transformers>=4.45",
        "tokenizers>=0.20",          # the tokenizer (albef_ds/tokenizer.py), without transformers' import
        "webdataset>=0.2.90",
        "mpi4py>=4.0",
        "mpich>=4.2",
        "tensorboard>=2.16",
        "numpy>=1.26",
        "pyyaml>=6.0",
        "safetensors>=0.4",
        # the search commands: nearest-neighbour index, the web page and its uploads
        "faiss-cpu>=1.8",
        "fastapi>=0.110",
        "uvicorn>=0.29",
        "python-multipart>=0.0.9",
    ],
    # the page's tests drive Debian's chromium + chromedriver (the Makefile installs them); scikit-image:
    # the real photographs of tools/make_photo_shards.py (tests/unit/test_data_pixels.py, the data bench)
    extras_require={"test": ["pytest>=8", "pytest-xdist>=3.5", "selenium>=4.20", "httpx>=0.27", "scikit-image>=0.22"]},
)
