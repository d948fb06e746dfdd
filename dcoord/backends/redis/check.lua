-- Prepended to the scripts that make more than one write (see scripts.py).
-- Redis does not roll a script back when a command in it fails, and an ACL can refuse a
-- command or a channel midway: such a script calls check(...) with each write it may
-- make (command, key, arguments) before the first one, so a denial changes nothing.
local function check(...)
  if not redis.acl_check_cmd(...) then
    error({err = 'NOPERM this user has no permissions to run: ' .. table.concat({...}, ' ')})
  end
end
