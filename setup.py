from setuptools import setup

setup(
    name="pathorl",
    version="0.1.0",
    description="RL post-training engine for multimodal pathology reasoning models",
    packages=["engine", "rollout", "rewards", "kernels", "launch"],
    # The pathology lexicon the entity reward reads; launch/configs for `python -m` use from a wheel.
    package_data={"rewards": ["data/*.json", "examples/*.py"], "launch": ["configs/*.yaml", "configs/*.json"]},
    python_requires=">=3.11",
)
