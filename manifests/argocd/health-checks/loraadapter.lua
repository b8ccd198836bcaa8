-- Argo CD health of a loraplex.dev LoraAdapter, from the status the operator writes.
-- Phases: Pending (its base or a Secret is missing: may still come, GitOps applies in any
-- order), Loading, Ready (servable on every pod), Degraded (on some), Failed (on none: the
-- Ready condition carries the engine's message). A rollout of a new revision (status.rollout)
-- is Progressing while it moves through its steps (not Degraded: traffic is split on purpose),
-- and Degraded once rolled back (the stable revision serves, the latest one was refused).
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
    if c.status ~= "True" and (c.type == "Ready" or c.type == "Accepted") and c.message ~= nil then
      message = c.message
    end
  end
end
local phase = obj.status.phase
if phase == "Ready" then
  hs.status = "Healthy"
elseif phase == "Degraded" or phase == "Failed" then
  hs.status = "Degraded"
else
  hs.status = "Progressing"
end
local counts = (obj.status.readyReplicas or 0) .. "/" .. (obj.status.totalReplicas or 0) .. " pods"
hs.message = phase .. " (" .. counts .. ")" .. (message and (": " .. message) or "")
local rollout = obj.status.rollout
if rollout ~= nil and rollout.phase ~= nil then
  local what = "Rollout of revision " .. (rollout.revision or "?")
  if rollout.phase == "RolledBack" then
    hs.status = "Degraded"
    hs.message = what .. " rolled back: " .. (rollout.message or rollout.reason or "")
  elseif rollout.phase == "Progressing" and hs.status == "Healthy" then
    hs.status = "Progressing"
    hs.message = what .. " at step " .. (rollout.step or "?") .. ": " .. (rollout.message or "")
  end
end
return hs
