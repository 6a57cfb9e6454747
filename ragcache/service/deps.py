"""Names under which handlers receive the app's singletons and the caller's tenant (see create_app's dependencies)."""

from litestar.di import NamedDependency

from ragcache.config import Settings
from ragcache.service.runtime import Runtime

RuntimeDep = NamedDependency[Runtime]
SettingsDep = NamedDependency[Settings]
TenantDep = NamedDependency[str]  # found by auth.tenant_guard, which the handler must have
