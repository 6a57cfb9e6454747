"""Names under which handlers receive the app's singletons (see create_app's dependencies)."""

from litestar.di import NamedDependency

from ragcache.config import Settings
from ragcache.service.runtime import Runtime

RuntimeDep = NamedDependency[Runtime]
SettingsDep = NamedDependency[Settings]
