"""Import circles among llmctl's modules, imports inside functions included (grimp reads them all): prints
each circle and their count, and exits 1 if there is any. `make lint` runs it beside `lint-imports`."""

from __future__ import annotations

import sys

import grimp


def import_circles(package: str = "llmctl") -> list[list[str]]:
    """The groups of modules that reach each other through imports (Tarjan's strongly connected components)."""
    graph = grimp.build_graph(package)
    edges = {module: sorted(graph.find_modules_directly_imported_by(module)) for module in graph.modules}
    index: dict[str, int] = {}
    lowest: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(edges[root]))]
        index[root] = lowest[root] = len(index)
        stack.append(root)
        while work:
            module, targets = work[-1]
            target = next((t for t in targets if t in edges), None)
            if target is not None:
                if target not in index:
                    index[target] = lowest[target] = len(index)
                    stack.append(target)
                    work.append((target, iter(edges[target])))
                elif target in stack:
                    lowest[module] = min(lowest[module], index[target])
                continue
            work.pop()
            if work:
                lowest[work[-1][0]] = min(lowest[work[-1][0]], lowest[module])
            if lowest[module] == index[module]:
                component = []
                while True:
                    member = stack.pop()
                    component.append(member)
                    if member == module:
                        break
                if len(component) > 1:
                    circles.append(sorted(component))
    return circles


def main() -> int:
    circles = import_circles()
    for circle in circles:
        print("import circle: " + " <-> ".join(circle))
    print(f"import circles in llmctl (module and function level): {len(circles)}")
    return 1 if circles else 0


if __name__ == "__main__":
    sys.exit(main())
