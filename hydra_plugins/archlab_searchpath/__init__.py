"""archlab's one Hydra SearchPathPlugin: adds the YAML presets that plugin distributions announce.

A distribution announces its presets with an entry point in the ``archlab.presets``
group whose value is a package holding ``<slot>/<name>.yaml`` files, e.g.
``archlab_plugins = "archlab_plugins.conf"``. Plugin authors never write a
``hydra_plugins`` module themselves. Kept cheap: Hydra imports it at every start.
"""

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


class ArchlabSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        from archlab.registry import preset_paths

        for path in preset_paths():
            search_path.append(provider="archlab-presets", path=path)
