{{- define "ntm.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "ntm.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "ntm.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ntm.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "ntm.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "ntm.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- /* NTM_INTERFACE: the interfacePreset's patterns, then .Values.interfaces;
       empty for the default-route interface. */}}
{{- define "ntm.interfaces" -}}
{{- $names := list -}}
{{- with .Values.interfacePreset -}}
{{- $preset := get $.Values.interfacePresets . -}}
{{- if not $preset -}}
{{- fail (printf "interfacePreset %q is not one of interfacePresets (%s)" . (keys $.Values.interfacePresets | sortAlpha | join ", ")) -}}
{{- end -}}
{{- $names = concat $names $preset -}}
{{- end -}}
{{- $names = concat $names .Values.interfaces | uniq -}}
{{- join "," $names -}}
{{- end -}}

