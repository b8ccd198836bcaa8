-- Argo CD health of an Application, as its own status reports it: lets sync waves of an app of
-- apps wait for the CRDs and the operator (Argo CD has no built-in check for Application).
local hs = {status = "Progressing", message = ""}
if obj.status ~= nil and obj.status.health ~= nil then
  hs.status = obj.status.health.status
  if obj.status.health.message ~= nil then
    hs.message = obj.status.health.message
  end
end
return hs
