import jax

from coars_jax import compilation_cache


def test_the_cache_is_on_in_the_named_folder_and_announced(tmp_path, monkeypatch, capsys):
  before = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
  try:
    monkeypatch.setenv(compilation_cache.ENV_VARIABLE, str(tmp_path / 'cache'))
    folder = compilation_cache.enable()
    assert folder == (tmp_path / 'cache').resolve() and folder.is_dir()
    assert jax.config.jax_compilation_cache_dir == str(folder)
    assert jax.config.jax_persistent_cache_min_compile_time_secs == compilation_cache.MIN_COMPILE_SECONDS
    assert f'[coars] JAX compilation cache: {folder}' in capsys.readouterr().err
    monkeypatch.setenv(compilation_cache.ENV_VARIABLE, 'off')
    assert compilation_cache.enable() is None and capsys.readouterr().err == ''
    assert jax.config.jax_compilation_cache_dir == str(folder)  # 'off' changes nothing
  finally:
    jax.config.update('jax_compilation_cache_dir', before[0])
    jax.config.update('jax_persistent_cache_min_compile_time_secs', before[1])


def test_the_default_folder_is_in_the_users_cache_directory(monkeypatch, tmp_path):
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
  assert compilation_cache.default_folder() == tmp_path / 'coars_jax' / 'jax_compilation_cache'
