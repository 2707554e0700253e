"""Toy worlds for Transformers trained from scratch, each with its own small token vocabulary."""

TOY_TASKS = {}
