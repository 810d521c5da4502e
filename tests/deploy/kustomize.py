"""A small kustomize renderer for this repository's k8s/ tree, so the manifests are tested without a kustomize
binary (CI images do not have one; when `kubectl` is present, a test checks that both renderings agree).

It implements exactly the kustomization fields k8s/ uses, and refuses any other field, so a new field cannot be
silently ignored:
  resources   files (multi-document YAML) and directories with their own kustomization.yaml
  patches     with `target`: RFC 6902 JSON patch (ops add / replace / remove) on the matching objects;
              without `target`: a strategic-merge patch that only deletes an object (`$patch: delete`)
  namespace   set on every object
  images      name -> newName / newTag on every `image:` field of the objects
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

SUPPORTED_FIELDS = {"apiVersion", "kind", "resources", "patches", "namespace", "images"}


class KustomizeError(ValueError):
    pass


def render(directory: Path) -> list[dict[str, Any]]:
    directory = Path(directory)
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(kustomization) - SUPPORTED_FIELDS
    if unsupported:
        raise KustomizeError(f"{directory}/kustomization.yaml: fields {sorted(unsupported)} are not supported here")
    objects: list[dict[str, Any]] = []
    for resource in kustomization.get("resources", []):
        path = directory / resource
        if path.is_dir():
            objects += render(path)
        else:
            objects += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    for patch in kustomization.get("patches", []):
        body = yaml.safe_load((directory / patch["path"]).read_text())
        if "target" in patch:
            targets = [o for o in objects if _matches(o, patch["target"])]
            if not targets:
                raise KustomizeError(f"{patch['path']}: no object matches target {patch['target']}")
            for obj in targets:
                _json_patch(obj, body, where=patch["path"])
        else:
            objects = _delete(objects, body, where=patch["path"])
    if "namespace" in kustomization:
        for obj in objects:
            obj.setdefault("metadata", {})["namespace"] = kustomization["namespace"]
    for image in kustomization.get("images", []):
        for obj in objects:
            _set_image(obj, image)
    return objects


def _matches(obj: dict, target: dict) -> bool:
    group, _, version = obj["apiVersion"].rpartition("/")
    wanted = {"group": group, "version": version, "kind": obj["kind"], "name": obj["metadata"]["name"]}
    return all(wanted[k] == v for k, v in target.items())


def _delete(objects: list[dict], body: dict, where: str) -> list[dict]:
    if body.get("$patch") != "delete":
        raise KustomizeError(f"{where}: only `$patch: delete` strategic-merge patches are supported here")
    key = (body["kind"], body["metadata"]["name"])
    kept = [o for o in objects if (o["kind"], o["metadata"]["name"]) != key]
    if len(kept) == len(objects):
        raise KustomizeError(f"{where}: nothing to delete for {key}")
    return kept


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise KustomizeError(f"JSON pointer {path!r} must start with /")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _json_patch(obj: dict, ops: list[dict], where: str) -> None:
    for op in ops:
        *parents, last = _pointer(op["path"])
        node: Any = obj
        try:
            for part in parents:
                node = node[int(part)] if isinstance(node, list) else node[part]
            if op["op"] == "remove":
                del node[int(last) if isinstance(node, list) else last]
            elif op["op"] in ("add", "replace"):
                value = copy.deepcopy(op["value"])
                if isinstance(node, list):
                    if op["op"] == "add":
                        node.insert(len(node) if last == "-" else int(last), value)
                    else:
                        node[int(last)] = value
                else:
                    if op["op"] == "replace" and last not in node:
                        raise KeyError(last)
                    node[last] = value
            else:
                raise KustomizeError(f"{where}: op {op['op']!r} is not supported here")
        except (KeyError, IndexError, ValueError, TypeError) as e:
            raise KustomizeError(f"{where}: {op['op']} {op['path']}: no such location ({e!r})") from e


def _set_image(node: Any, image: dict) -> None:
    if isinstance(node, list):
        for item in node:
            _set_image(item, image)
    elif isinstance(node, dict):
        current = node.get("image")
        if isinstance(current, str):
            name, _, tag = current.partition(":")
            if name == image["name"]:
                node["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"
        for value in node.values():
            _set_image(value, image)
