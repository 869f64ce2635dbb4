from setuptools import setup

setup(
    name="pathorl",
    version="0.1.0",
    description="RL post-training engine for multimodal pathology reasoning models",
    packages=["engine", "rollout", "rewards", "kernels", "launch"],
    python_requires=">=3.11",
)
