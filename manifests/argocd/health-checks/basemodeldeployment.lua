-- Argo CD health of a loraplex.dev BaseModelDeployment, from the status the operator writes.
-- Phases: Pending (no pod Ready yet), Ready, Degraded (fewer Ready pods than desired), Failed.
local hs = {status = "Progressing", message = "Waiting for the loraplex operator"}
if obj.status == nil or obj.status.phase == nil then
  return hs
end
local gen = obj.metadata.generation
if gen ~= nil and obj.status.observedGeneration ~= nil and obj.status.observedGeneration < gen then
  hs.message = "Waiting for the operator to act on generation " .. gen
  return hs
end
local message = nil
if obj.status.conditions ~= nil then
  for _, c in ipairs(obj.status.conditions) do
    if c.status ~= "True" and c.type == "Available" and c.message ~= nil then
      message = c.message
    elseif c.status == "True" and c.type == "Degraded" and c.message ~= nil then
      message = c.message
    end
  end
end
local ready = obj.status.readyReplicas or 0
local desired = obj.status.desiredReplicas or obj.spec.replicas or 1
local phase = obj.status.phase
if phase == "Ready" then
  hs.status = "Healthy"
elseif phase == "Degraded" or phase == "Failed" then
  hs.status = "Degraded"
else
  hs.status = "Progressing"
end
hs.message = message or (phase .. ": " .. ready .. "/" .. desired .. " engine pods ready")
return hs
